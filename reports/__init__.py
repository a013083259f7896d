"""Reports: a self-contained HTML page and PNG charts rendered from the artifacts (never a model)."""

from sensplan.reports._render import FIGURES, render_report

__all__ = ["FIGURES", "render_report"]
