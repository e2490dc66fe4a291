"""The HTML report: built from a small fixture run directory (no model), checked as text and in a real browser."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pystream.report import main as report_main
from pystream.report import write_report
from pystream.results import META, RESULTS, SCHEMA, SCHEMA_VERSION, record

HOSTILE = "<script>alert('x')</script>"
ARTIFACTS = Path(os.environ.get("PYSTREAM_ARTIFACTS", Path(__file__).resolve().parent.parent / "artifacts"))


def make_run(folder: Path, *, model_name="smollm2-135m", scale=1.0) -> Path:
    folder.mkdir(parents=True)
    meta = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "started": "2026-11-28T10:00:00+0000",
        "command": f"pystream-bench --lengths 4k,1M --model '{model_name}'",
        "config": {"mode": "state", "dtype": "float32", "batch": 1},
        "versions": {"pystream": "0.1.0", "torch": "2.13.0"}, "git_commit": "abc123",
        "device": {"kind": "cpu", "name": "Test CPU", "threads": 1},
        "model": {"name": model_name, "kind": "folder", "model_type": "llama", "layers": 30,
                  "max_position_embeddings": 8192},
        "text": {"name": "kjv", "tokens": 1_000_000},
    }
    (folder / META).write_text(json.dumps(meta))
    records = []
    for length in (4096, 1048576):
        for cache in (256, 1024):
            recompute = 600.0 * cache / 256 * scale
            for method, p50, sinks in (("recompute", recompute, 0), ("sink", 52.0 * scale, 4),
                                       ("window", 51.0 * scale, 0)):
                records.append(record(
                    "cell", method=method, cache_size=cache, length=length, mode="state", sinks=sinks,
                    window=cache - sinks, status="ok",
                    latency_ms={"p50": p50, "p90": p50 * 1.05, "p99": p50 * 1.1, "mean": p50, "min": p50 * 0.95,
                                "max": p50 * 1.2},
                    tokens_per_s=1000 / p50, peak_rss_bytes=1_000_000_000, kv_bytes=cache * 46_080,
                    speedup_vs_recompute=recompute / p50, text_cycled=length > 1_000_000))
        if length == 4096:
            records.append(record("cell", method="dense", cache_size=None, length=length, mode="state",
                                  status="ok", latency_ms={"p50": 110.0, "p90": 112.0, "p99": 115.0, "mean": 110.0,
                                                           "min": 100.0, "max": 120.0},
                                  tokens_per_s=9.1, peak_rss_bytes=1_400_000_000, kv_bytes=4096 * 46_080,
                                  speedup_vs_recompute={"256": 5.4, "1024": 21.0}))
        else:
            records.append(record("cell", method="dense", cache_size=None, length=length, mode="state",
                                  status="oom", error="OOM: needs 45.0 GiB, 22.6 GiB available"))
    nll = [2.0 + 0.001 * i for i in range(1535)]
    for method, cache, ppl in (("dense", None, 4.1), ("sink", 256, 4.4), ("window", 256, 11.2)):
        records.append(record("quality", method=method, cache_size=cache, length=1536, mode="quality", status="ok",
                              tokens=1536, sinks=4 if method == "sink" else 0, ppl=ppl, ppl_ci95=None,
                              sampled=False, sample_size=None, nll=nll, pretraining_length=8192,
                              buckets=[{"start": 1, "end": 257, "tokens": 256, "ppl": ppl}]))
    sampled = [None] * 1535
    for i in range(0, 1535, 20):
        sampled[i] = 1.5
    records.append(record("quality", method="recompute", cache_size=256, length=1536, mode="quality", status="ok",
                          tokens=1536, sinks=0, ppl=5.2, ppl_ci95=[2.8, 9.8], sampled=True, sample_size=77,
                          nll=sampled, pretraining_length=8192,
                          buckets=[{"start": 1, "end": 257, "tokens": 13, "ppl": 5.0},
                                   {"start": 257, "end": 513, "tokens": 13, "ppl": 5.4}]))
    (folder / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


EXPECTED_FIGURES = ["fig-latency", "fig-throughput", "fig-memory", "fig-kv", "fig-ppl-position", "fig-ppl"]


def test_report_holds_figures_and_rows(tmp_path):
    run = make_run(tmp_path / "run")
    html = write_report([run], tmp_path / "report.html").read_text()
    for fig in EXPECTED_FIGURES:
        assert f"id='fig-{fig[4:]}'" in html
    # one summary row per cell: 2 lengths x (3 methods x 2 caches + dense)
    assert len(re.findall(r"<tr(?: class='oom')?><td>run</td>", html)) == 14 + 4
    assert "OOM: needs 45.0 GiB, 22.6 GiB available" in html
    assert "4+252" in html and "sampled at 77 positions" in html
    assert html.count("<script>") == 2  # plotly.js once, the figures once: nothing fetched
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=\"?https?:", html)


def test_user_strings_are_escaped(tmp_path):
    run = make_run(tmp_path / "run", model_name=HOSTILE)
    html = write_report([run], tmp_path / "report.html").read_text()
    assert HOSTILE not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html


def test_two_runs_side_by_side_with_ratios(tmp_path):
    a, b = make_run(tmp_path / "main"), make_run(tmp_path / "branch", scale=1.25)
    html = write_report([a, b], tmp_path / "compare.html").read_text()
    assert "Side by side: latency ratio to main" in html
    assert html.count("<td class='slower'>1.250</td>") == 12  # every scaled cell...
    assert html.count("<td class=''>1.000</td>") == 1  # ...and dense, which was not
    assert "[branch]" in html  # figure traces carry their run


def test_report_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / META).write_text("{not json")
    assert report_main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert "run.json: invalid JSON" in err and err.count("\n") == 1
    assert report_main([str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    newer = make_run(tmp_path / "newer")
    rec = json.loads((newer / RESULTS).read_text().splitlines()[0])
    rec["schema_version"] = SCHEMA_VERSION + 1
    (newer / RESULTS).write_text(json.dumps(rec) + "\n")
    assert report_main([str(newer)]) == 2
    assert "newer pystream" in capsys.readouterr().err


# ---- in a real browser -------------------------------------------------------------------------------------------------

def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


# Put first in <head>: records script errors and console.error calls where --dump-dom will show them.
PROBE = """<script>
window.__errors = [];
const keep = (m) => { window.__errors.push(String(m)); document.documentElement.setAttribute('data-errors',
  JSON.stringify(window.__errors)); };
window.addEventListener('error', (e) => keep(e.message || e));
window.addEventListener('unhandledrejection', (e) => keep(e.reason));
const original = console.error; console.error = (...a) => { keep(a.join(' ')); original(...a); };
window.alert = (m) => keep('alert ran: ' + m);
window.addEventListener('load', () => setTimeout(() =>
  document.documentElement.setAttribute('data-loaded', '1'), 500));
</script>"""


def run_chromium(chromium, page: Path, *extra, timeout=120):
    args = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            # networking off: every host resolves to nothing, and any proxy use fails
            "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9",
            "--virtual-time-budget=30000", *extra, page.as_uri()]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


@pytest.mark.browser
def test_report_renders_in_a_real_browser(tmp_path):
    chromium = find_chromium()
    if chromium is None:
        if os.environ.get("PYSTREAM_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed (CI installs it: apt-get install chromium)")
        pytest.skip("chromium is not installed")
    run = make_run(tmp_path / "run", model_name=HOSTILE)
    report = write_report([run], tmp_path / "report.html")
    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text().replace("<head>", "<head>" + PROBE, 1))
    dom = run_chromium(chromium, probed, "--dump-dom").stdout
    assert 'data-loaded="1"' in dom, "the page did not finish loading"
    errors = re.search(r'data-errors="([^"]*)"', dom)
    assert errors is None, f"console errors: {errors.group(1) if errors else ''}"
    assert "<script>alert(" not in dom  # the hostile model name stayed text (and alert() never ran: see errors)
    for fig in EXPECTED_FIGURES:
        start = dom.index(f'id="{fig}"')
        end = dom.find('class="figure"', start + 1)
        section = dom[start:end if end > 0 else len(dom)]
        assert 'class="main-svg"' in section, f"{fig} has no SVG"
        points = section.count('class="point"') + section.count('class="js-line"')
        assert points > 0, f"{fig} drew no data points"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report-screenshot.png"
    result = run_chromium(chromium, report, f"--screenshot={shot}", "--window-size=1400,4800")
    assert result.returncode == 0 and shot.stat().st_size > 50_000
