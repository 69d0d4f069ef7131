"""The report's charts, drawn by matplotlib as SVG.

matplotlib rather than a JavaScript plotting library: the report must open offline from one
file, and SVG needs no script at all (Plotly would inline ~4 MB of JavaScript). Text is drawn
as paths, so the charts look the same without the fonts; ids are salted with a fixed string so
the same data gives the same file.
"""

from __future__ import annotations

import io
from collections import Counter

import matplotlib
from matplotlib.figure import Figure

COLORS = {"kept": "#2a9d8f", "dropped here": "#e76f51", "dropped later": "#f4a261", "failed": "#9b2226"}
STYLE = {"svg.hashsalt": "bricks-report", "svg.fonttype": "path", "font.size": 9}


def _svg(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    with matplotlib.rc_context(STYLE):
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    return buffer.getvalue()


def _figure(width: float = 6.0, height: float = 3.0) -> tuple[Figure, object]:
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width, height))
        ax = fig.add_subplot()
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what}", ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


def funnel(steps: list[dict]) -> bytes:
    """Per operator: samples out, dropped and failed, as stacked horizontal bars."""
    with matplotlib.rc_context(STYLE):
        fig, ax = _figure(7.0, 0.45 * len(steps) + 1.0)
        labels = [s["label"] for s in steps][::-1]
        out = [s["out"] or 0 for s in steps][::-1]
        dropped = [s["dropped"] for s in steps][::-1]
        failed = [s["failed"] for s in steps][::-1]
        ax.barh(labels, out, color=COLORS["kept"], label="out")
        ax.barh(labels, dropped, left=out, color=COLORS["dropped here"], label="dropped")
        ax.barh(labels, failed, left=[o + d for o, d in zip(out, dropped)], color=COLORS["failed"], label="failed")
        ax.set_xlabel("sources or samples")
        # above the bars, which reach the right edge where nothing is dropped
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1), ncols=3, frameon=False)
        return _svg(fig)


def score_histogram(column: str, values: dict[str, list[float]], thresholds: list[tuple[str, float]]) -> bytes:
    """Kept and dropped values of one score column, stacked, with its thresholds drawn."""
    with matplotlib.rc_context(STYLE):
        fig, ax = _figure()
        groups = [(name, v) for name, v in values.items() if v]
        if not groups:
            _empty(ax, f"{column} values")
            return _svg(fig)
        ax.hist([v for _, v in groups], bins=30, stacked=True, color=[COLORS[n] for n, _ in groups],
                label=[f"{n} ({len(v)})" for n, v in groups])
        for name, value in thresholds:
            ax.axvline(value, color="#264653", linestyle="--", linewidth=1.2)
            ax.annotate(f"{name} {value:g}", (value, 1), xycoords=("data", "axes fraction"), rotation=90,
                        ha="right", va="top", fontsize=8, color="#264653")
        ax.set_xlabel(column)
        ax.set_ylabel("samples")
        ax.legend(frameon=False)
        return _svg(fig)


def histogram(values: list[float], xlabel: str, line: tuple[str, float] | None = None, bins: int = 30) -> bytes:
    with matplotlib.rc_context(STYLE):
        fig, ax = _figure(4.5, 2.6)
        if not values:
            _empty(ax, xlabel)
            return _svg(fig)
        ax.hist(values, bins=bins, color=COLORS["kept"])
        if line is not None:
            ax.axvline(line[1], color="#9b2226", linestyle="--", linewidth=1.2)
            ax.annotate(f"{line[0]} {line[1]:g}", (line[1], 1), xycoords=("data", "axes fraction"), rotation=90,
                        ha="right", va="top", fontsize=8, color="#9b2226")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("samples")
        return _svg(fig)


def bars(counts: Counter | dict, xlabel: str, top: int = 15) -> bytes:
    """Counts per category, the `top` most frequent, largest first."""
    with matplotlib.rc_context(STYLE):
        items = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))[:top]
        fig, ax = _figure(4.5, 0.3 * len(items) + 1.0)
        if not items:
            _empty(ax, xlabel)
            return _svg(fig)
        ax.barh([str(k) for k, _ in items][::-1], [n for _, n in items][::-1], color=COLORS["kept"])
        ax.set_xlabel(xlabel)
        return _svg(fig)
