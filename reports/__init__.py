"""Reports: a self-contained HTML page and PNG charts rendered from the artifacts alone (never a
model, never torch)."""

from sensplan.reports._render import FIGURES, render_report
from sensplan.reports._verdict import Verdict, verdict, verdict_line, verdict_of

__all__ = ["FIGURES", "Verdict", "render_report", "verdict", "verdict_line", "verdict_of"]
