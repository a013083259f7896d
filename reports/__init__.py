"""Reports: a self-contained HTML page and PNG charts rendered from the artifacts alone (never a
model, never torch)."""

from sensplan.reports._render import FIGURES, render_report

__all__ = ["FIGURES", "render_report"]
