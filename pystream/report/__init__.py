"""pystream-report: the HTML report, from saved results alone. Imports only `pystream.results` (and plotly): no
torch, transformers or C++ extension, so any machine can render a run."""

from .html import build_report, main, write_report

__all__ = ["build_report", "main", "write_report"]
