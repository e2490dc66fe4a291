"""Golden files: every committed example run (reports/**/results.jsonl) is read with today's reader and rendered with
today's report, so a schema change that breaks old runs fails here; the runs carry no absolute path of the machine
they ran on; and the report renders in a process where torch, transformers and the C++ extension cannot be imported."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pystream.report import build_report
from pystream.results import RESULTS, Run, load_run

REPORTS = Path(__file__).resolve().parent.parent / "reports"
RUNS = sorted(p.parent for p in REPORTS.rglob(RESULTS))
# A path of the machine: /tmp/..., /home/..., /work/... (not "4+1020" or a "k/s" unit): a slash that starts a word
# and is followed by a directory name and another slash.
ABSOLUTE = re.compile(r"(?<![\w.~+-])/[A-Za-z0-9_.-]+/")


def test_there_are_committed_runs():
    assert {p.relative_to(REPORTS).as_posix() for p in RUNS} >= {"default-run", "paper-experiment",
                                                                   "context-extension", "gpu-h200/cells", "recall"}


@pytest.mark.parametrize("run_dir", RUNS, ids=lambda p: p.relative_to(REPORTS).as_posix())
def test_committed_run_reads_and_renders(run_dir):
    run = load_run(run_dir)
    lines = [line for line in (run_dir / RESULTS).read_text().splitlines() if line.strip()]
    assert len(run.records) == len(lines) > 0
    assert {r["record"] for r in run.records} <= {"cell", "quality", "attention", "recall"}
    page = build_report([(run_dir.name, run)])
    assert "Plotly.newPlot" in page and "id='fig-" in page
    if any(r["record"] == "cell" for r in run.records):
        assert "<table class='cells'>" in page
    if any(r["record"] == "recall" and r["probe"] == "placement" for r in run.records):
        assert "id='fig-recall'" in page and "id='fig-recall-placement'" in page


def strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


@pytest.mark.parametrize("run_dir", RUNS, ids=lambda p: p.relative_to(REPORTS).as_posix())
def test_committed_run_has_no_machine_path(run_dir):
    texts = list(strings(json.loads((run_dir / "run.json").read_text())))
    texts += [s for line in (run_dir / RESULTS).read_text().splitlines() for s in strings(json.loads(line))]
    assert [t for t in texts if ABSOLUTE.search(t)] == []


def test_machine_path_check_can_fail():
    assert ABSOLUTE.search("/work/venv/lib/python3.11/site-packages/bible/data/kjv.jsonl")
    assert ABSOLUTE.search("pystream-bench --model /tmp/smol-random --out x")
    assert not ABSOLUTE.search("bible/data/kjv.jsonl") and not ABSOLUTE.search("sink 4+1020, 12 tok/s")


def test_bundled_sources_are_recorded_relative_to_their_package():
    from pystream.inputs.models import package_dir, package_relative

    folder = package_dir("bible")
    if folder is None:
        pytest.skip("the bundled text is not installed")
    assert package_relative(folder / "data" / "kjv.jsonl", "bible") == "bible/data/kjv.jsonl"


NO_ENGINE = """
import sys
for name in ("torch", "transformers", "pystream._core"):
    sys.modules[name] = None  # any import of them now raises ImportError
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("the block did not work")
from pystream.report import main
code = main([sys.argv[1], "-o", sys.argv[2]])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers") or m == "pystream._core"
                if sys.modules[m] is not None)
print("loaded:", loaded)
sys.exit(code)
"""


def test_report_renders_without_torch_transformers_or_the_core(tmp_path):
    out = tmp_path / "report.html"
    result = subprocess.run([sys.executable, "-c", NO_ENGINE, str(REPORTS / "paper-experiment"), str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "loaded: []" in result.stdout
    assert "The paper's findings: ours beside the paper's" in out.read_text()


def test_the_block_would_catch_an_import_of_torch(tmp_path):
    """The same subprocess fails when what it renders needs torch (here: a module that imports it)."""
    code = NO_ENGINE.replace("from pystream.report import main", "import pystream.measure.clocks\n"
                             "from pystream.report import main")
    result = subprocess.run([sys.executable, "-c", code, str(REPORTS / "default-run"), str(tmp_path / "r.html")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "import of torch halted" in result.stderr


def test_cache_size_hover_reads_sinks_plus_window():
    """The cache-size ablation hovers "cache 4+252" for a capacity of 256, as the tables write it."""
    from pystream.report.html import fig_cache_sizes
    from pystream.results import record

    recs = [record("quality", method="sink", cache_size=c, sinks=4, length=4096, mode="experiment:cache",
                   status="ok", tokens=4096, ppl=6.0, experiments=["cache"]) for c in (256, 512)]
    fig = fig_cache_sizes([("run", Run(Path("run"), {}, recs))])
    trace = fig.data[0]
    assert list(trace.customdata) == ["4+252", "4+508"]
    assert "4+%{x}" not in trace.hovertemplate and "%{customdata}" in trace.hovertemplate
