"""pystream-bench --ray: a sweep on a local Ray cluster writes what the sequential run writes; a worker that dies is
retried and its cell recorded once; a killed driver resumes; no Ray or no cluster is one line, exit 2.

Ray announces the machine's interface address even when told 127.0.0.1 (see the README, "Running on a cluster"), so
the tests that start a cluster (marked `ray`) run only inside a network namespace of their own, where loopback is the
only interface: `test_ray_suite_in_its_own_network_namespace` re-runs this file under `unshare -n` when the test
process is not in one, and those tests skip outside it. Every cluster is started by a pystream-bench subprocess,
which shuts it down; a driver the test kills is killed with every process of its session (Ray's included)."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import read_records, run_cli, tiny_args

REPO = Path(__file__).resolve().parent.parent
HAS_RAY = importlib.util.find_spec("ray") is not None


def _interfaces() -> list[str]:
    """This network namespace's interfaces (/proc/net/dev is per namespace; /sys/class/net may be the host's)."""
    try:
        lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    except OSError:
        return []
    return sorted(line.split(":")[0].strip() for line in lines)


# Only the loopback interface: Ray cannot reach (or announce) anything else.
ISOLATED = _interfaces() == ["lo"]
needs_cluster = [pytest.mark.ray,
                 pytest.mark.skipif(not HAS_RAY, reason="ray is not installed (pip install 'pystream[ray]')"),
                 pytest.mark.skipif(not ISOLATED, reason="starts Ray: runs only in a network namespace of its own "
                                                         "(test_ray_suite_in_its_own_network_namespace)")]
CLUSTER_TIMEOUT_S = 600


def cluster_test(test):
    for mark in needs_cluster:
        test = mark(test)
    return test


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def test_ray_suite_in_its_own_network_namespace():
    if ISOLATED:
        pytest.skip("already inside a network namespace of its own: the tests below run here")
    # CI sets PYSTREAM_REQUIRE_RAY=1: there the Ray tests must run, not skip
    skip = pytest.fail if os.environ.get("PYSTREAM_REQUIRE_RAY") == "1" else pytest.skip
    if not HAS_RAY:
        skip("ray is not installed (pip install 'pystream[ray]')")
    if not _unshare_works():
        skip("unshare -n is not permitted here (needs root or user namespaces)")
    command = (f"ip link set lo up && exec {sys.executable} -m pytest {__file__} -m ray -q -p no:cacheprovider "
               "-x -W ignore::DeprecationWarning")
    result = subprocess.run(["unshare", "-n", "bash", "-c", command], cwd=REPO, capture_output=True, text=True,
                            timeout=CLUSTER_TIMEOUT_S * 2)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout.splitlines()[-1], result.stdout[-2000:]


# ---- driving pystream-bench in a subprocess ------------------------------------------------------------------------

def bench(args, env=None, timeout=CLUSTER_TIMEOUT_S):
    return subprocess.run([sys.executable, "-m", "pystream.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def sweep_args(model_dir, text, out, *extra):
    # 2 lengths x 2 capacities x (recompute, sink, window) + dense per length = 14 cells;
    # quality of the 4 methods at each of the 2 lengths = 8 passes
    return tiny_args(model_dir, text, out, *extra)


def key(rec):
    return (rec["record"], rec["method"], rec.get("cache_size"), rec.get("length"), rec.get("mode"),
            rec.get("sinks") or 0)


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # field 6 of stat: the session id
                pids.append(int(entry.name))
    return pids


def kill_session(sid: int) -> None:
    """Kill every process of the session a test started (the driver and the Ray processes it spawned)."""
    for _ in range(50):
        pids = session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


# ---- with a cluster ------------------------------------------------------------------------------------------------

@cluster_test
def test_sweep_on_ray_writes_what_the_sequential_run_writes(tiny_model_dir, text_file, tmp_path, capsys):
    sequential, clustered = tmp_path / "seq", tmp_path / "ray"
    assert run_cli(sweep_args(tiny_model_dir, text_file, sequential), capsys)[0] == 0
    result = bench([*sweep_args(tiny_model_dir, text_file, clustered), "--ray", "local", "--ray-cpus", "2"])
    assert result.returncode == 0, result.stderr[-4000:]
    seq, ray = read_records(sequential), read_records(clustered)
    assert len([r for r in ray if r["record"] == "cell"]) >= 8
    assert sorted(map(key, ray)) == sorted(map(key, seq)) and len(set(map(key, ray))) == len(ray)
    by_seq = {key(r): r for r in seq}
    for rec in ray:
        twin = by_seq[key(rec)]
        assert rec["status"] == twin["status"] == "ok"
        if rec["record"] == "quality":  # the same numbers, wherever they ran
            assert rec["ppl"] == twin["ppl"] and rec["nll"] == twin["nll"], rec["method"]
            assert rec.get("ppl_ci95") == twin.get("ppl_ci95")
        else:
            for field in ("kv_bytes", "stream_position", "evicted", "frame_base", "text_cycled", "window", "batch",
                          "timed_steps"):
                assert rec.get(field) == twin.get(field), (key(rec), field)
            # the recompute cell it is compared with ran first, as in the sequential run
            assert (rec["speedup_vs_recompute"] is None) == (twin["speedup_vs_recompute"] is None), key(rec)
        where = rec["ran_on"]
        assert where["node"] == socket.gethostname() and where["threads"] == 1 and where["device"] == "cpu"
        assert where["device_name"] and where["node_id"]
    pids = {r["ran_on"]["pid"] for r in ray}
    assert len(pids) >= 2, "every task ran in one worker process: nothing ran side by side"
    meta = json.loads((clustered / "run.json").read_text())
    nodes = meta["cluster"]["nodes"]
    assert len(nodes) == 1 and nodes[0]["resources"]["CPU"] == 2 and nodes[0]["address"] == "127.0.0.1"
    assert "running on" in result.stderr and "Ray cluster: 1 node(s), 2 CPU(s)" in result.stderr
    # the bar's ETA on the cluster: 2 items at once, each measured by its worker's time; logged like a local run's
    from pystream.measure.eta import read_log

    (session,) = read_log(clustered / "eta.jsonl")
    assert len(session["items"]) == len(ray) and session["items"][-1]["eta_s"] == 0
    walls = {(e["label"]): e["actual_s"] for e in session["items"]}
    assert all(s > 0 for s in walls.values())
    from pystream.report import write_report

    html = write_report([clustered], tmp_path / "report.html").read_text()
    assert "<h2>Cells</h2>" in html and "fig-nodes" not in html  # one node: nothing to tell apart


@cluster_test
def test_a_worker_killed_mid_cell_is_retried_and_recorded_once(tiny_model_dir, text_file, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "killed-once"
    args = sweep_args(tiny_model_dir, text_file, out, "--methods", "sink,window", "--ppl-tokens", "0", "--ray",
                      "local", "--ray-cpus", "2")
    result = bench(args, env={"PYSTREAM_TEST_KILL_WORKER": str(marker)})
    assert result.returncode == 0, result.stderr[-4000:]
    assert Path(f"{marker}.0").exists()  # a worker did die mid-task
    records = read_records(out)
    assert len(records) == 2 * 2 * 2 and len(set(map(key, records))) == len(records)
    assert all(r["status"] == "ok" for r in records)  # the killed cell was run again; none became an error


@cluster_test
def test_a_task_failing_for_good_is_an_error_record_and_the_run_goes_on(tiny_model_dir, text_file, tmp_path):
    from pystream.measure.cluster import MAX_RETRIES

    out, marker = tmp_path / "run", tmp_path / "killed"
    args = sweep_args(tiny_model_dir, text_file, out, "--methods", "sink,window", "--ppl-tokens", "0",
                      "--lengths", "100", "--ray", "local", "--ray-cpus", "2")
    # every attempt of the window cells dies: 1 + MAX_RETRIES attempts each, two cells
    result = bench(args, env={"PYSTREAM_TEST_KILL_WORKER": f"{marker}:{2 * (1 + MAX_RETRIES)}:window"})
    assert result.returncode == 0, result.stderr[-4000:]
    records = read_records(out)
    assert len(records) == 4 and len(set(map(key, records))) == 4
    status = {(r["method"], r["cache_size"]): r["status"] for r in records}
    assert status == {("sink", 16): "ok", ("sink", 32): "ok", ("window", 16): "error", ("window", 32): "error"}
    assert all("Worker" in r["error"] for r in records if r["status"] == "error"), records


@cluster_test
def test_a_killed_driver_resumes_on_the_cluster(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "run"
    # long enough cells that the driver is killed mid-sweep
    args = sweep_args(tiny_model_dir, text_file, out, "--steps", "300", "--ray", "local", "--ray-cpus", "2")
    driver = subprocess.Popen([sys.executable, "-m", "pystream.cli", *map(str, args)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + CLUSTER_TIMEOUT_S
        results = out / "results.jsonl"
        while time.monotonic() < deadline and driver.poll() is None:
            if results.exists() and len(results.read_bytes().splitlines()) >= 3:
                break
            time.sleep(0.05)
        assert driver.poll() is None, "the sweep ended before the driver could be killed"
    finally:
        kill_session(driver.pid)  # SIGKILL: no clean-up runs, Ray's processes go with it
        driver.wait(timeout=60)
    before = read_records(out)
    assert 3 <= len(before) < 22
    result = bench([*args, "--resume"])
    assert result.returncode == 0, result.stderr[-4000:]
    records = read_records(out)
    assert len(records) == 22 and len(set(map(key, records))) == 22  # every cell and pass exactly once
    assert records[:len(before)] == before  # what was written stays as it was
    assert f"resumed: {len(before)} finished" in result.stderr


# ---- without a cluster: checked before anything is created ----------------------------------------------------------

def test_ray_not_installed_is_one_line(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "run"
    blocked = ("import sys; sys.modules['ray'] = None; from pystream.cli import main; "
               f"sys.exit(main({[str(a) for a in sweep_args(tiny_model_dir, text_file, out, '--ray', 'local')]!r}))")
    result = subprocess.run([sys.executable, "-c", blocked], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == 'pystream-bench: error: --ray: Ray is not installed; pip install "pystream[ray]"'
    assert not out.exists()


def test_unreachable_cluster_is_one_line(tiny_model_dir, text_file, tmp_path, capsys):
    pytest.importorskip("ray")
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "run"
    for address, message in ((f"127.0.0.1:{port}", "cannot reach the cluster"), ("nonsense", "not HOST:PORT")):
        code, _, stderr = run_cli(sweep_args(tiny_model_dir, text_file, out, "--ray", address), capsys)
        assert code == 2 and message in stderr and stderr.strip().count("\n") == 0, stderr
        assert not out.exists()


def test_ray_options_are_checked(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    for extra, message in ((["--ray-cpus", "2"], "pass --ray local too"),
                           (["--ray", "127.0.0.1:1", "--ray-gpus", "1"], "only sizes a local cluster"),
                           (["--ray", "local", "--ray-cpus", "0"], "out of range"),
                           (["--ray", "local", "--experiment", "paper"], "--experiment runs in one process")):
        code, _, stderr = run_cli([*sweep_args(tiny_model_dir, text_file, out), *extra], capsys)
        assert code == 2 and message in stderr and stderr.strip().count("\n") == 0, (extra, stderr)
        assert not out.exists()
