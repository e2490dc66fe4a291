"""The run's progress display: rich's bars on a terminal, plain lines in a log.

A task made with a `plan` (pystream.measure.eta.Plan) is drawn from it: its share done in estimated seconds, its
count of items, its ETA from measured rates. Every other task is drawn as rich draws it, plus its rate in its own
unit (`add_task(..., unit="tokens")` shows "812 tokens/s").

rich draws nothing while it runs when stderr is not a terminal (a job scheduler's log, `nohup`, a pipe): a
1,048,576-token stream would then print nothing for 20 minutes. So on such a console `RunProgress` writes plain
lines instead: one when a task starts, one per task at most every `log_every_s` seconds while it advances (share
done, count, rate, elapsed, ETA), and one when it ends, with its mean rate over the part this session ran.
"""

from __future__ import annotations

import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, \
    TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from .eta import format_seconds

LOG_EVERY_S = 60.0  # a line per task per minute: about 20 lines for a 1M-token stream, 85 for 4M


class PlanBar(BarColumn):
    def render(self, task):
        bar = super().render(task)
        plan = task.fields.get("plan")
        if plan is not None:
            bar.total, bar.completed = 1.0, plan.fraction()
        return bar


class PlanPercent(ProgressColumn):
    """The share done, as the bar shows it: a plan's fraction in estimated seconds, else completed / total."""

    def render(self, task):
        plan = task.fields.get("plan")
        share = plan.fraction() if plan is not None else (None if task.total is None else task.percentage / 100)
        return Text("" if share is None else f"{100 * share:5.1f}%", style="progress.percentage")


class PlanCount(MofNCompleteColumn):
    def render(self, task):
        plan = task.fields.get("plan")
        if plan is None:
            return super().render(task)
        total = len(plan.finished) + len(plan.pending)
        return Text(f"{len(plan.finished)}/{total}", style="progress.download")


class PlanRemaining(ProgressColumn):
    default = TimeRemainingColumn()

    def render(self, task):
        plan = task.fields.get("plan")
        if plan is None:
            return self.default.render(task)
        return Text(format_seconds(plan.remaining_s()), style="progress.remaining")


def format_rate(per_s: float, unit: str) -> str:
    return f"{per_s:,.0f} {unit}/s" if per_s >= 10 else f"{per_s:.2f} {unit}/s"


class RateColumn(ProgressColumn):
    """Units per second over rich's recent window (30 s), for a task that names its `unit`; blank otherwise (a plan's
    items differ in cost by orders of magnitude, so items per second says nothing)."""

    def render(self, task):
        unit = task.fields.get("unit")
        if unit is None or task.fields.get("plan") is not None or not task.speed:
            return Text("")
        return Text(format_rate(task.speed, unit), style="progress.data.speed")


def _columns(bar):
    return [TextColumn("{task.description}"), bar, PlanCount(), RateColumn(), TimeElapsedColumn(),
            TextColumn("ETA"), PlanRemaining()]


class RunProgress(Progress):
    """rich's `Progress` with `_columns`; on a console that is not a terminal, plain lines as the module says.
    `clock` (seconds, monotonic) is rich's `get_time` too, so that tests drive both."""

    def __init__(self, console, log_every_s: float = LOG_EVERY_S, clock=time.monotonic):
        super().__init__(*_columns(PlanBar()), console=console, get_time=clock)
        self.logging = not console.is_jupyter and (not console.is_terminal or console.is_dumb_terminal)
        self.log_every_s, self.clock = log_every_s, clock
        self._log_columns = _columns(PlanPercent())
        self._logged_at: dict = {}  # task id -> clock of its last line
        self._started_at: dict = {}  # task id -> (clock, completed) when added: a resumed task's rate is its own

    def _line(self, task) -> Text:
        parts = [column.render(task) for column in self._log_columns]
        return Text(" ").join(p for p in parts if isinstance(p, Text) and p.plain)

    def _log(self, task_id, force: bool = False) -> None:
        with self._lock:  # a cluster sweep's driver may report from more than one thread
            now = self.clock()
            if not force and now - self._logged_at.get(task_id, now) < self.log_every_s:
                return
            self._logged_at[task_id] = now
            line = self._line(self._tasks[task_id])
        self.console.print(line, soft_wrap=True, highlight=False)

    def add_task(self, description, *args, **kwargs):
        task_id = super().add_task(description, *args, **kwargs)
        if self.logging:
            self._started_at[task_id] = (self.clock(), self._tasks[task_id].completed)
            self._log(task_id, force=True)
        return task_id

    def update(self, task_id, *args, **kwargs):
        super().update(task_id, *args, **kwargs)
        if self.logging and task_id in self._tasks:
            self._log(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        if self.logging:
            self._log(task_id)

    def remove_task(self, task_id) -> None:
        if self.logging and task_id in self._tasks:
            task = self._tasks[task_id]
            started, completed = self._started_at.pop(task_id, (self.clock(), task.completed))
            elapsed_s, done = self.clock() - started, task.completed - completed
            unit = task.fields.get("unit")
            rate = f", {format_rate(done / elapsed_s, unit)}" if unit and done and elapsed_s > 0 else ""
            total = "" if task.total is None else f" of {task.total:,.0f}"
            state = "done" if task.total is not None and task.completed >= task.total else "ended at"
            line = Text.from_markup(task.description)
            line.append(f": {state} {task.completed:,.0f}{total}{' ' + unit if unit else ''} "
                        f"in {format_seconds(elapsed_s)}{rate}")
            self.console.print(line, soft_wrap=True, highlight=False)
            self._logged_at.pop(task_id, None)
        super().remove_task(task_id)


def make_progress(console, log_every_s: float = LOG_EVERY_S) -> RunProgress:
    return RunProgress(console, log_every_s)


__all__ = ["LOG_EVERY_S", "RateColumn", "RunProgress", "format_rate", "make_progress"]
