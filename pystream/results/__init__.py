"""Results: the run directory (`run.json`, `results.jsonl`), its schema, reader and writer, the summaries printed at
the end of a run, and our numbers beside the paper's. Plain Python: no torch, transformers or C++ extension, so old
runs can be read and reported anywhere.

    schema   what a record is (`record`), what identifies it (`record_key`), labels
    store    reading (`load_run`, `read_results`) and writing (`RunWriter`) run directories
    paper    ours beside the paper's reference numbers (`paper_table`)
    summary  the rich tables printed at the end of a run
"""

from .._files import write_atomic
from .schema import SCHEMA, SCHEMA_VERSION, ResultsError, cache_label, peak_bytes, record, record_key
from .store import ETA_LOG, LOCK, META, RESULTS, ResultsWriteError, Run, RunWriter, load_run, read_meta, read_results

__all__ = ["SCHEMA", "SCHEMA_VERSION", "RESULTS", "META", "LOCK", "ResultsError", "record", "record_key",
           "cache_label", "peak_bytes", "read_results", "read_meta", "Run", "load_run", "RunWriter",
           "ResultsWriteError", "write_atomic"]
