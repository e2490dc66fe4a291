"""pystream-bench on a Ray cluster: each cell and each quality pass is a Ray task; the driver is the only writer.

A driver (this layer: it measures through `Bench`, it writes nothing itself). `Sweep.run(writer, progress)` submits
every unfinished item of the plan, and hands each measurement to `writer.append` as its task finishes (completion
order), so a killed driver loses at most the tasks in flight and `--resume` skips the rest. Workers load the model
and text themselves (by path or hub id: a path must exist on every node) and keep them per worker process.

Ray is optional (`pip install "pystream[ray]"`): nothing here imports it at module level.

Dependencies between cells are kept as in the sequential run: a cell's `speedup_vs_recompute` needs the recompute
cells of its length, so a sink/window cell is submitted once recompute at its (length, capacity) is recorded, and a
dense one once every recompute of its length is. A task whose worker process dies is retried by Ray (`max_retries`);
only the attempt that returns reaches the driver, so a cell is recorded exactly once. A task that fails for good
(an exception, or a worker dying on every attempt) becomes a record with status "error", and the run goes on.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

MAX_RETRIES = 2  # a worker that dies while running a task: Ray runs the task again, at most this many times
# Test hook, "MARKER[:TIMES[:METHOD]]": the first TIMES attempts (default 1) of tasks (of METHOD, when given) kill
# their worker process mid-task, as a crashed or OOM-killed worker would die; attempt i claims the file MARKER.i
# (O_EXCL: exactly once across the cluster).
KILL_ENV = "PYSTREAM_TEST_KILL_WORKER"


class ClusterError(Exception):
    """Ray is missing or the cluster cannot be reached: one line for the command line."""


# ---- before anything is created -----------------------------------------------------------------------------------

def require_ray():
    try:
        import ray
    except ImportError:
        raise ClusterError('--ray: Ray is not installed; pip install "pystream[ray]"') from None
    return ray


def resolve_address(address: str) -> str | None:
    """HOST:PORT of the cluster `--ray` names; None for "local" (start one). "auto": $RAY_ADDRESS, else the cluster
    `ray start` left on this machine."""
    if address == "local":
        return None
    if address == "auto":
        found = os.environ.get("RAY_ADDRESS")
        current = Path("/tmp/ray/ray_current_cluster")  # written by `ray start --head`
        if not found and current.is_file():
            found = current.read_text().strip()
        if not found:
            raise ClusterError("--ray: no running cluster found on this machine (start one with `ray start --head`, "
                               "or pass --ray HEAD:PORT, or --ray local)")
        address = found
    return address.removeprefix("ray://") if address.startswith("ray://") else address


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A TCP connection to the head's control store (GCS) port: fails in seconds where ray.init would hang."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ClusterError(f"--ray {address}: not HOST:PORT (the head's address, as `ray start --head` prints it)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        raise ClusterError(f"--ray {address}: cannot reach the cluster ({err.strerror or err})") from None


def check(address: str) -> str | None:
    """Everything `--ray ADDRESS` needs that can be checked before the run directory exists."""
    require_ray()
    resolved = resolve_address(address)
    if resolved is not None:
        check_reachable(resolved)
    return resolved


# ---- the cluster --------------------------------------------------------------------------------------------------

@dataclass
class Cluster:
    started_s: float  # ray.init's wall time: a local cluster's start-up cost, or joining a remote one
    local: bool
    address: str | None

    def describe(self) -> dict:
        """For run.json: the nodes and their resources."""
        import ray

        nodes = []
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            resources = {k: v for k, v in node.get("Resources", {}).items() if not k.startswith("node:")}
            nodes.append({"name": node.get("NodeManagerHostname"), "address": node.get("NodeManagerAddress"),
                          "node_id": node.get("NodeID"), "resources": resources})
        return {"address": "local" if self.local else self.address, "nodes": nodes,
                "resources": {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")},
                "start_s": round(self.started_s, 2)}

    def shutdown(self) -> None:
        import ray

        ray.shutdown()


def connect(address: str | None, cpus: int | None, gpus: int | None) -> Cluster:
    """Join the cluster at `address`, or start a local one of `cpus` CPUs and `gpus` GPUs (None: this machine's)."""
    ray = require_ray()
    started = time.perf_counter()
    options = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        if address is None:
            ray.init(num_cpus=cpus, num_gpus=gpus, **options)
        else:
            ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ClusterError(f"--ray {address or 'local'}: {str(err).splitlines()[0]}") from None
    return Cluster(time.perf_counter() - started, address is None, address)


# ---- on a worker --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadSpec:
    """What a worker loads: the same model and text as the driver, by name (a path must exist on every node)."""

    model: str | None
    text: str | None
    device: str
    dtype: str
    trust_remote_code: bool
    threads: int
    seed: int


class _NoProgress:
    """Workers have no terminal: the driver's bar counts tasks."""

    def add_task(self, *args, **kwargs):
        return 0

    def advance(self, *args, **kwargs):
        pass

    def update(self, *args, **kwargs):
        pass

    def remove_task(self, *args, **kwargs):
        pass


_BENCHES: dict = {}  # per worker process: (LoadSpec, BenchConfig) -> Bench, so a model loads once per worker


def _bench(spec: LoadSpec, cfg):
    key = (spec, cfg)
    if key not in _BENCHES:
        from ..inputs.models import load_model
        from ..inputs.texts import load_text, tokenize
        from .runner import Bench

        _BENCHES.clear()  # one model per worker process at a time
        text = load_text(spec.text)
        loaded = load_model(spec.model, device=spec.device, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code)
        ids = tokenize(text, loaded.tokenizer)  # from the node's token cache after the first time
        # No run directory: traces and stream checkpoints would land on the worker's disk, and only the driver writes.
        _BENCHES[key] = Bench(cfg, loaded.model, ids, _NoProgress(), run_dir=None)
    return _BENCHES[key]


def where(spec: LoadSpec) -> dict:
    """Where a task ran, for its record."""
    import torch

    from .clocks import cpu_model

    node_id = None
    try:
        import ray

        node_id = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside a Ray worker there is no node id; where() still says the rest
        pass
    device_name = torch.cuda.get_device_name(0) if spec.device == "cuda" else cpu_model()
    return {"node": socket.gethostname(), "node_id": node_id, "device": spec.device, "device_name": device_name,
            "threads": spec.threads, "pid": os.getpid()}


def _kill_hook(items) -> None:
    setting = os.environ.get(KILL_ENV)
    if not setting:
        return
    marker, _, rest = setting.partition(":")
    times, _, method = rest.partition(":")
    if method and items[0][1] != method:
        return
    for attempt in range(int(times or 1)):
        try:
            os.close(os.open(f"{marker}.{attempt}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        os._exit(1)  # the worker process dies mid-task, as if killed


def run_items(spec: LoadSpec, cfg, items: list[tuple], done: list[dict], tracker=None, key=None) -> list[dict]:
    """The body of a task: run cells (("cell", method, capacity, length)) and quality passes (("quality",
    QualityItem)) on this worker, return their measurements, each saying where it ran. `done`: the finished records
    a task reads (recompute's cells for the speedup, the quality record recompute's NLL is paired with)."""
    import torch

    if tracker is not None:
        tracker.started.remote(key, socket.gethostname())
    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    bench = _bench(spec, cfg)
    _kill_hook(items)
    ran_on = where(spec)
    out = []
    for item in items:
        if item[0] == "cell":
            measured = bench.run_cell(item[1], item[2], item[3], done)
        else:
            measured = bench.run_quality(item[1], done)
        out.append(dict(measured, ran_on=ran_on))
    return out


class Tracker:
    """A Ray actor (no CPU) the tasks tell when they start: which tasks are running, on which nodes."""

    def __init__(self):
        self.running: dict = {}

    def started(self, key, node):
        self.running[key] = node

    def snapshot(self):
        return dict(self.running)


# ---- the driver ---------------------------------------------------------------------------------------------------

def task_resources(device: str, threads: int) -> dict:
    """One GPU per task on a GPU device (its CPU threads then only drive it); its threads as CPUs otherwise."""
    return {"num_gpus": 1, "num_cpus": 1} if device == "cuda" else {"num_cpus": threads}


class Sweep:
    """The plan of a `Bench` run as Ray tasks; `run(writer, progress)` records each as it finishes."""

    def __init__(self, bench, spec: LoadSpec, max_retries: int = MAX_RETRIES):
        self.bench, self.spec, self.max_retries = bench, spec, max_retries

    def _plan(self, writer) -> tuple[list[tuple], int]:
        """Tasks still to run, as (key, items, dependencies); and how many records are already done."""
        from .quality_at import pair_candidates

        bench, tasks, skipped = self.bench, [], 0
        cfg = bench.cfg
        for name, capacity, length in bench.cells():
            if writer.done(bench.cell_identity(name, capacity, length)) is not None:
                skipped += 1
                continue
            if name == "recompute" or "recompute" not in cfg.methods:
                deps = []
            elif capacity is None:  # dense: its speedup is against every capacity's recompute of its length
                deps = [bench.cell_identity("recompute", c, length) for c in cfg.cache_sizes]
            else:
                deps = [bench.cell_identity("recompute", capacity, length)]
            tasks.append((("cell", name, capacity, length), [("cell", name, capacity, length)], deps))
        plan = bench.quality_plan()
        for item in plan:
            if writer.done(bench.quality_identity(item)) is not None:
                skipped += 1
                continue
            # recompute's NLL is paired with the record of the same length that ran before it in the plan (sink)
            deps = [bench.quality_identity(other) for other in pair_candidates(cfg, plan, item)]
            tasks.append((("quality", item), [("quality", item)], deps))
        return tasks, skipped

    def run(self, writer, progress, plan=None) -> int:
        """Run every unfinished task; returns how many records were already done (skipped). `plan` (an
        `eta.Plan` of the same cells and passes) draws the bar: an item starts when its task is seen running and
        is measured by the time its worker spent on it (the record's `wall_s`)."""
        import ray

        tasks, skipped = self._plan(writer)
        self.plan = plan
        self.by_key = {} if plan is None else {("quality", i.run) if i.quality else ("cell", *i.run): i
                                               for i in plan.items}
        total_records = sum(len(items) for _, items, _ in tasks)
        remote = ray.remote(max_retries=self.max_retries, retry_exceptions=False, max_calls=0,
                            **task_resources(self.spec.device, self.spec.threads))(run_items)
        tracker = ray.remote(num_cpus=0)(Tracker).remote()
        spec_ref, cfg_ref = ray.put(self.spec), ray.put(self.bench.cfg)
        overall = progress.add_task("[bold]cells", total=total_records, plan=plan)
        waiting = list(tasks)
        pending: dict = {}
        recorded = 0

        def finished(dep) -> bool:
            return writer.done(dep) is not None

        def submit_ready():
            for task in list(waiting):
                key, items, deps = task
                if all(finished(d) for d in deps):
                    waiting.remove(task)
                    done = [r for r in writer.records if (r.get("record") == "cell" and r.get("method") == "recompute")
                            or r.get("record") == "quality"]
                    ref = remote.remote(spec_ref, cfg_ref, items, done, tracker, key)
                    pending[ref] = (key, items)

        submit_ready()
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in ready:
                    key, items = pending.pop(ref)
                    for item, measured in zip(items, self._results(ref, items)):
                        writer.append(measured)
                        self._finished(item, measured)
                        recorded += 1
                        progress.advance(overall)
                    submit_ready()
                self._show(progress, overall, tracker, pending, recorded, total_records)
        finally:
            for ref in pending:  # interrupted: nothing in flight is recorded; --resume runs it again
                ray.cancel(ref, force=True)
        return skipped

    def _results(self, ref, items) -> list[dict]:
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayError as err:
            # failed for good: the task raised, or its worker died on every attempt
            message = str(err).strip().splitlines()
            cause = getattr(err, "cause", None)
            text = f"{type(cause).__name__}: {cause}" if cause is not None else (message[-1] if message else
                                                                                 type(err).__name__)
            return [dict(self._identity(item), status="error", error=f"{type(err).__name__}: {text}"[:500])
                    for item in items]

    def _finished(self, key, rec: dict) -> None:
        item = self.by_key.get(key)
        if item is None or item not in self.plan.pending:
            return
        ok = rec.get("status") == "ok" and bool(item.parts) and isinstance(rec.get("wall_s"), (int, float))
        self.plan.finish(item, seconds=rec.get("wall_s") if ok else 0.0, setup_s=rec.get("setup_s"), measured=ok,
                         scale=item.scale(rec))

    def _identity(self, item) -> dict:
        if item[0] == "cell":
            return self.bench.cell_identity(*item[1:])
        return self.bench.quality_identity(item[1])

    def _show(self, progress, overall, tracker, pending, recorded, total) -> None:
        import ray

        try:
            running = ray.get(tracker.snapshot.remote(), timeout=2)
        except ray.exceptions.RayError:
            return
        keys = {key for key, _ in pending.values()}
        if self.plan is not None:  # the bar's clock of an item starts when its task is seen running
            for key in running:
                item = self.by_key.get(key)
                if key in keys and item is not None and item in self.plan.pending and id(item) not in self.plan.running:
                    self.plan.start(item)
        nodes = {node for key, node in running.items() if key in keys}
        busy = sum(key in keys for key in running)
        progress.update(overall, description=f"[bold]cells[/bold] ({busy} running on {len(nodes)} node(s))")


__all__ = ["Cluster", "ClusterError", "LoadSpec", "Sweep", "check", "connect", "run_items", "where", "MAX_RETRIES"]
