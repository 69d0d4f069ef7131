"""`bricks-dj report OUT`: one self-contained HTML file, OUT/report.html, that says what a run
did: the funnel, score histograms with their thresholds, thumbnails of kept samples and of
dropped ones near each threshold, distributions of the kept samples, and optionally how a
training config would bucket them. Written at the end of every run and on demand.

`gather` reads the output (pure data), `tokens` counts caption tokens, `trainer_view` asks the
trainer's own planner, `thumbs` cuts frame strips, `charts` draws SVG, `page` assembles it.
"""

from .gather import ReportError
from .page import REPORT, ReportOptions, write_report

__all__ = ["REPORT", "ReportError", "ReportOptions", "write_report"]
