"""The run directory: one per `pystream-bench` run, the only thing the report step reads.

    RUN_DIR/
      run.json        what ran: command line, arguments, versions, git commit, device, CPU, threads, date
      results.jsonl   one JSON record per finished cell or quality measurement, appended as each finishes
      eta.jsonl       what the progress bar's ETA predicted against what each item took (a diagnostic; nothing reads
                      it but bench/eta_accuracy.py): a plan line per session, a line per finished item
      report.html     written at the end (pystream-report rebuilds it from the two files above)
      .lock           held while a run writes here; removed when the run ends (a killed run leaves it, unlocked)

Schema (`schema_version` 1), every record has `schema`, `schema_version` and `record`:
  record "cell"     one (method, cache size, stream length): latency_ms {p50,p90,p99,mean,min,max}, tokens_per_s,
                    peak memory, kv_bytes, speedup_vs_recompute; `status` "ok", "oom" or "unsupported" (then `error` says why)
  record "quality"  per-token NLL of one method over the first tokens of the text: ppl, buckets, nll series
  record "recall"   (--experiment recall) recall of a planted passage at one distance for one method: first_nll,
                    repeat_nll per passage, recall, ci95 (README, "What each method remembers")
See README.md ("Results files") for every field.

A record is one line, written completely (`os.write` is repeated until every byte is out) and fsync'ed: a run
killed at any moment loses at most the record being measured. A torn last line (killed mid-write) is ignored on
reading and dropped on resume. A write that fails (a full disk, a file-size limit) is cut back to the last whole
record and raised as `ResultsWriteError`, so the file always ends on a record boundary and the next append, once
space is back, starts on one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .._files import read_regular_file, write_atomic, write_text_atomic
from .schema import ResultsError, check_version, record, record_key, validate_record

__all__ = ["RESULTS", "META", "LOCK", "ETA_LOG", "read_results", "read_meta", "Run", "load_run", "RunWriter", "ResultsWriteError",
           "write_atomic"]

RESULTS = "results.jsonl"
META = "run.json"
ETA_LOG = "eta.jsonl"
LOCK = ".lock"
# Read at most this much (regular files only: a FIFO in their place would block the reader forever). A record is a
# few KB (a quality record with 12k NLL values ~100 KB), so 1 GiB is ~10,000 records of the largest kind.
MAX_RESULTS_BYTES = 1 << 30
MAX_META_BYTES = 16 << 20


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def _finite_float(text):
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is out of range")
    return value


def read_results(path: Path) -> tuple[list[dict], int]:
    """Records of a results file, and the byte length of its valid part (a torn last line is left out).
    Any other damage is a ResultsError naming the file and the line."""
    data = read_regular_file(path, str(path), MAX_RESULTS_BYTES, ResultsError)
    records, valid = [], 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        last = number == len(lines)
        if not line.strip():
            if not last:
                valid += len(line) + 1
            continue
        try:
            rec = json.loads(line, parse_constant=_no_constant, parse_float=_finite_float)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as err:
            if last:  # the process was killed while writing this line: everything before it stands
                break
            raise ResultsError(f"{path}:{number}: invalid JSON ({err.msg if hasattr(err, 'msg') else err})") from None
        if last:
            break  # a complete record always ends with a newline; without one it may be cut short
        if not isinstance(rec, dict):
            raise ResultsError(f"{path}:{number}: a record must be a JSON object")
        check_version(rec, f"{path}:{number}")
        validate_record(rec, f"{path}:{number}")
        records.append(rec)
        valid += len(line) + 1
    return records, valid


def read_meta(run_dir: Path) -> dict:
    path = run_dir / META
    try:
        os.stat(path)
    except FileNotFoundError:
        raise ResultsError(f"{run_dir}: not a pystream run directory (no {META})") from None
    except NotADirectoryError:
        raise ResultsError(f"{run_dir}: not a directory") from None
    except OSError as err:
        raise ResultsError(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        meta = json.loads(read_regular_file(path, str(path), MAX_META_BYTES, ResultsError).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ResultsError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ResultsError(f"{path}: must hold a JSON object")
    check_version(meta, str(path))
    for name, kind in (("config", dict), ("versions", dict), ("device", dict), ("model", dict), ("text", dict),
                       ("command", str), ("started", str), ("git_commit", str), ("runs", int)):
        if meta.get(name) is not None and (not isinstance(meta[name], kind) or isinstance(meta[name], bool)):
            raise ResultsError(f"{path}: field {name!r} has the wrong type")
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


class ResultsWriteError(ResultsError):
    """A record could not be written (a full disk, a file-size limit); the file was cut back to its last whole
    record."""


def _write_all(fd: int, data: bytes) -> None:
    """`os.write` may write fewer bytes than asked (a disk filling up, a file-size limit): repeat until all are out;
    a write that makes no progress raises."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(28, "No space left on device (a write made no progress)")
        view = view[written:]


class RunWriter:
    """Appends records to a run directory it holds locked."""

    def __init__(self, run_dir: Path, meta: dict, *, resume: bool):
        self.path = run_dir
        self._lock_file = None
        self.records: list[dict] = []
        self._end = 0  # bytes of results.jsonl that are whole records: where the next record starts
        try:
            self._open(meta, resume)
        except OSError as err:  # a full disk or a read-only file while writing run.json or truncating
            self.close()
            raise ResultsError(f"{self.path}: cannot write the run directory ({err.strerror or err})") from None

    def _open(self, meta: dict, resume: bool) -> None:
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
        self._end = valid
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
        path = self.path / RESULTS
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as err:
            raise ResultsWriteError(f"{path}: cannot open for writing ({err.strerror or err})") from None
        try:
            if os.fstat(fd).st_size != self._end:  # a cut record left by an earlier failure that could not be undone
                os.ftruncate(fd, self._end)
            _write_all(fd, line)
            os.fsync(fd)
        except BaseException as err:  # a failed write, or Ctrl-C / SIGTERM in the middle of one
            # cut back to the last whole record, so that the file stays readable and a later append (space back)
            # does not glue its record onto a fragment; if even that fails, the next append tries again
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._end)
                os.fsync(fd)
            if not isinstance(err, OSError):
                raise
            raise ResultsWriteError(f"{path}: cannot write a record ({err.strerror or err}); the file ends at its last "
                                    "whole record") from None
        finally:
            os.close(fd)
        self._end += len(line)
        self.records.append(rec)
        return rec

    def log(self, name: str, entry: dict) -> bool:
        """Append one JSON line to the side log `name` of the run directory (eta.jsonl), written whole and
        fsync'ed like a record. A diagnostic: a write that fails returns False and the run goes on (the caller
        stops logging); the log is never read back by the run, the report or --resume."""
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode("utf-8")
        try:
            fd = os.open(self.path / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError:
            return False
        try:
            _write_all(fd, line)
            os.fsync(fd)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._lock_file is not None:
            # removed while still held, so that no other run can lock the file this one is about to let go of
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path / LOCK)
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None
