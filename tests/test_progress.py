"""The progress display: a rate in the task's unit beside the ETA, and plain lines when stderr is not a terminal
(a job's log), where rich itself draws nothing until the end. Driven by a fake clock, so no test sleeps."""

import io
import re

from rich.console import Console

from pystream.measure.progress import RunProgress, format_rate


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def progress_on(terminal: bool, log_every_s: float = 60.0):
    out, clock = io.StringIO(), Clock()
    console = Console(file=out, force_terminal=terminal, width=200, color_system=None)
    return RunProgress(console, log_every_s=log_every_s, clock=clock), out, clock


def lines(out) -> list[str]:
    return [line for line in out.getvalue().splitlines() if line.strip()]


def test_log_lines_rate_and_eta_at_the_interval():
    progress, out, clock = progress_on(terminal=False)
    with progress:
        task = progress.add_task("stability: 1,000 tokens", total=1000, unit="tokens")
        for _ in range(100):  # 100 updates of 10 tokens, 1 s apart: 100 s, 10 tokens/s
            clock.now += 1.0
            progress.advance(task, 10)
        progress.remove_task(task)
    got = lines(out)
    # the start, one line at 60 s (not one per update), the end
    assert len([g for g in got if g.startswith("stability")]) == 3, got
    start, middle, end = got[:3]
    assert "0/1000" in start and "0.0%" in start
    # at 60 s: 600 of 1000 done at 10 tokens/s, so 40 s left
    assert "60.0%" in middle and "600/1000" in middle and "10 tokens/s" in middle, middle
    assert re.search(r"ETA 0:00:4[01]", middle), middle
    assert end == "stability: 1,000 tokens: done 1,000 of 1,000 tokens in 0:01:40, 10 tokens/s", end


def test_a_resumed_task_reports_the_rate_of_what_it_ran():
    progress, out, clock = progress_on(terminal=False)
    with progress:
        task = progress.add_task("stream", total=1000, completed=500, unit="tokens")
        clock.now += 25.0
        progress.update(task, completed=600)  # 100 tokens in 25 s, not 600
        progress.remove_task(task)
    assert lines(out)[-1] == "stream: ended at 600 of 1,000 tokens in 0:00:25, 4.00 tokens/s"


def test_no_log_lines_on_a_terminal():
    progress, out, clock = progress_on(terminal=True)
    with progress:
        task = progress.add_task("stream", total=100, unit="tokens")
        for _ in range(10):
            clock.now += 100.0
            progress.advance(task, 10)
        progress.remove_task(task)
    assert "done" not in out.getvalue()  # rich draws the bar itself; the plain lines are for logs only


def test_rate_column_names_the_unit():
    progress, out, clock = progress_on(terminal=True)
    task = progress.add_task("stream", total=1000, unit="tokens")
    for _ in range(5):
        clock.now += 2.0
        progress.advance(task, 50)
    row = " ".join(str(c) for c in progress.make_tasks_table([progress._tasks[task]]).columns[3].cells)
    assert "25 tokens/s" in row, row
    assert format_rate(812.4, "tokens") == "812 tokens/s" and format_rate(0.5, "cells") == "0.50 cells/s"
