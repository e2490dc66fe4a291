"""The run directory: one per `pystream-bench` run, the only thing the report step reads.

    RUN_DIR/
      run.json        what ran: command line, arguments, versions, git commit, device, CPU, threads, date
      results.jsonl   one JSON record per finished cell or quality measurement, appended as each finishes
      report.html     written at the end (pystream-report rebuilds it from the two files above)
      .lock           held while a run writes here; removed when the run ends (a killed run leaves it, unlocked)

Schema (`schema_version` 1), every record has `schema`, `schema_version` and `record`:
  record "cell"     one (method, cache size, stream length): latency_ms {p50,p90,p99,mean,min,max}, tokens_per_s,
                    peak memory, kv_bytes, speedup_vs_recompute; `status` "ok" or "oom" (then `error` says why)
  record "quality"  per-token NLL of one method over the first tokens of the text: ppl, buckets, nll series
  record "recall"   (--experiment recall) recall of a planted passage at one distance for one method: first_nll,
                    repeat_nll per passage, recall, ci95 (README, "What each method remembers")
See README.md ("Results files") for every field.

A record is written with one `write` of one line, flushed and fsync'ed: a run killed at any moment loses at most
the record being measured. A torn last line (killed mid-write) is ignored on reading and dropped on resume.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .._files import write_atomic, write_text_atomic
from .schema import ResultsError, check_version, record, record_key

__all__ = ["RESULTS", "META", "LOCK", "read_results", "read_meta", "Run", "load_run", "RunWriter", "write_atomic"]

RESULTS = "results.jsonl"
META = "run.json"
LOCK = ".lock"


def read_results(path: Path) -> tuple[list[dict], int]:
    """Records of a results file, and the byte length of its valid part (a torn last line is left out).
    Any other damage is a ResultsError naming the file and the line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ResultsError(f"{path}: is a directory, not a results file") from None
    records, valid = [], 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        last = number == len(lines)
        if not line.strip():
            if not last:
                valid += len(line) + 1
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            if last:  # the process was killed while writing this line: everything before it stands
                break
            raise ResultsError(f"{path}:{number}: invalid JSON ({err.msg if hasattr(err, 'msg') else err})") from None
        if last:
            break  # a complete record always ends with a newline; without one it may be cut short
        if not isinstance(rec, dict):
            raise ResultsError(f"{path}:{number}: a record must be a JSON object")
        check_version(rec, f"{path}:{number}")
        records.append(rec)
        valid += len(line) + 1
    return records, valid


def read_meta(run_dir: Path) -> dict:
    path = run_dir / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsError(f"{run_dir}: not a pystream run directory (no {META})") from None
    except NotADirectoryError:
        raise ResultsError(f"{run_dir}: not a directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ResultsError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ResultsError(f"{path}: must hold a JSON object")
    check_version(meta, str(path))
    return meta


@dataclass
class Run:
    path: Path
    meta: dict
    records: list[dict]


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ResultsError(f"{run_dir}: no such run directory")
    if not run_dir.is_dir():
        raise ResultsError(f"{run_dir}: not a directory")
    meta = read_meta(run_dir)
    records, _ = read_results(run_dir / RESULTS) if (run_dir / RESULTS).exists() else ([], 0)
    return Run(run_dir, meta, records)


class RunWriter:
    """Appends records to a run directory it holds locked."""

    def __init__(self, run_dir: Path, meta: dict, *, resume: bool):
        self.path = run_dir
        self._lock_file = None
        self.records: list[dict] = []
        if resume:
            self._open_existing(meta)
        else:
            self._create(meta)

    # -- opening ----------------------------------------------------------------------------------------------------
    def _lock(self):
        while True:
            handle = open(self.path / LOCK, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise ResultsError(f"{self.path}: another pystream-bench run is writing here (locked); wait for it "
                                   "or choose another --out") from None
            # close() removes the file before unlocking it: a lock taken on a file that has meanwhile been removed
            # (or replaced by a newer run's) guards nothing, so open the path again
            try:
                same = os.path.samestat(os.fstat(handle.fileno()), os.stat(self.path / LOCK))
            except FileNotFoundError:
                same = False
            if same:
                self._lock_file = handle
                return
            handle.close()

    def _create(self, meta: dict) -> None:
        parent = self.path.parent
        if self.path.exists() and any(self.path.iterdir()):
            raise ResultsError(f"{self.path}: already holds a run; pass --resume to continue it, or choose another "
                               "--out")
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.path.mkdir(exist_ok=True)
        except OSError as err:
            raise ResultsError(f"{self.path}: cannot create the run directory ({err.strerror})") from None
        if not os.access(self.path, os.W_OK):
            raise ResultsError(f"{self.path}: not writable")
        self._lock()
        write_text_atomic(self.path / META, json.dumps(meta, indent=2) + "\n")
        (self.path / RESULTS).touch()

    def _open_existing(self, meta: dict) -> None:
        if not (self.path / META).exists():
            raise ResultsError(f"{self.path}: nothing to resume (no {META}); run without --resume first")
        self._lock()
        old = read_meta(self.path)
        for key in ("model", "text", "mode", "dtype", "batch", "sinks", "device_kind", "experiment"):
            if old.get("config", {}).get(key) != meta.get("config", {}).get(key):
                raise ResultsError(
                    f"{self.path}: cannot resume with a different {key} "
                    f"({old.get('config', {}).get(key)!r} there, {meta.get('config', {}).get(key)!r} now)"
                )
        results = self.path / RESULTS
        records, valid = read_results(results) if results.exists() else ([], 0)
        if results.exists() and results.stat().st_size != valid:
            with open(results, "r+b") as handle:  # drop a torn last line before appending
                handle.truncate(valid)
        self.records = records
        meta = dict(meta, resumed_from=old.get("started"), runs=old.get("runs", 1) + 1)
        write_text_atomic(self.path / META, json.dumps(meta, indent=2) + "\n")

    # -- writing ----------------------------------------------------------------------------------------------------
    def done(self, identity: dict) -> dict | None:
        """The finished record with the identity (`record_key`) of `identity`, a record or the start of one."""
        key = record_key(identity)
        for rec in self.records:
            if record_key(rec) == key:
                return rec
        return None

    def append(self, measured: dict) -> dict:
        """Write one measurement (`{"record": kind, ...fields}`, as the drivers make them) as a schema-stamped
        record; returns the record."""
        rec = record(measured["record"], **{k: v for k, v in measured.items() if k != "record"})
        line = (json.dumps(rec, separators=(",", ":")) + "\n").encode("utf-8")
        fd = os.open(self.path / RESULTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records.append(rec)
        return rec

    def close(self) -> None:
        if self._lock_file is not None:
            # removed while still held, so that no other run can lock the file this one is about to let go of
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path / LOCK)
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None
