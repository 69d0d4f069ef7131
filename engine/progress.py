"""Progress while a recipe runs, and the summary after it.

On a terminal: a live bar of sources, with the samples so far, the decode rate and the frames
decoded in each source in flight. Elsewhere (a log file, a pipe): the same as a plain line every
`interval` seconds, also while one long source decodes. Lines are made of phrases: on a terminal
they break between phrases to fit its width, elsewhere they are never broken.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from rich.console import Console
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .live_frames import FrameBoard, InFlight
from .run import SourceDone

SEPARATOR = ", "
INDENT = "  "


def break_phrases(phrases: list[str], width: int | None) -> list[str]:
    """`phrases` joined into lines of at most `width` characters, broken only between phrases
    (a phrase longer than `width` gets a line of its own); one line when `width` is None."""
    if width is None:
        return [SEPARATOR.join(phrases)]
    lines: list[str] = []
    line = ""
    for phrase in phrases:
        joined = f"{line}{SEPARATOR}{phrase}" if line else phrase
        if line and len(joined) > width:
            lines.append(line + SEPARATOR.rstrip())
            line = INDENT + phrase
        else:
            line = joined
    lines.append(line)
    return lines


def in_flight_phrases(items: list[InFlight]) -> list[str]:
    phrases = []
    for item in sorted(items, key=lambda i: i.uri):
        name = os.path.basename(item.uri.rstrip("/")) or item.uri
        total = f"/{item.expected}" if item.expected >= item.frames else ""
        phrases.append(f"{item.frames}{total} frames of {name}")
    return phrases


class RunProgress:
    def __init__(self, console: Console | None = None, interval: float = 10.0,
                 frames: FrameBoard | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self.interval = interval
        self.frames = frames if frames is not None else FrameBoard()
        self.kept = self.rejected = self.decoded = self.done = self.failed = 0
        self.total = 0
        self._bar: _Bar | None = None
        self._task = None
        self._started = time.monotonic()
        self._last_line = self._started
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def start(self, total: int, already_done: int) -> None:
        self.total = total - already_done
        if already_done:
            self._say([f"resuming: {already_done} of {total} sources already done"])
        if self.live:
            self._bar = _Bar(self._describe, TextColumn("[bold]sources"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)
            self._bar.start()
            self._task = self._bar.add_task("run", total=self.total)
        else:
            self._say([f"processing {self.total} sources"])
            self._ticker = threading.Thread(target=self._tick, name="bricks-progress", daemon=True)
            self._ticker.start()

    def source(self, done: SourceDone) -> None:
        with self._lock:
            self.done += 1
            self.kept += done.kept
            self.rejected += done.rejected
            self.decoded += done.frames
            self.failed += done.status == "failed"
        self.frames.finish(done.uri)
        if self._bar is not None:
            self._bar.update(self._task, advance=1)
        elif self.done == self.total or time.monotonic() - self._last_line >= self.interval:
            self.line()

    def line(self) -> None:
        """One plain progress line (off a terminal)."""
        self._last_line = time.monotonic()
        self._say(self.status_phrases(with_eta=True) + self.decoding_phrases())

    def status_phrases(self, with_eta: bool = False) -> list[str]:
        with self._lock:
            done, kept, rejected, decoded = self.done, self.kept, self.rejected, self.decoded
        elapsed = max(time.monotonic() - self._started, 1e-9)
        frames = decoded + sum(item.frames for item in self.frames.in_flight())
        phrases = [f"{done}/{self.total} sources", f"{kept} samples kept", f"{rejected} rejected",
                   f"{frames / elapsed:.0f} frames/s"]
        if with_eta and done:
            phrases.append(f"eta {(self.total - done) * elapsed / done:.0f}s")
        return phrases

    def decoding_phrases(self) -> list[str]:
        phrases = in_flight_phrases(self.frames.in_flight())
        return [f"decoding {phrases[0]}", *phrases[1:]] if phrases else []

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self._bar is not None:
            self._bar.stop()

    def _tick(self) -> None:
        while not self._stop.wait(min(self.interval, 1.0)):
            if time.monotonic() - self._last_line >= self.interval and self.done < self.total:
                self.line()

    def _describe(self) -> list[str]:
        width = self.console.width
        return break_phrases(self.status_phrases(), width) + break_phrases(self.decoding_phrases(), width)

    def _say(self, phrases: list[str]) -> None:
        width = self.console.width if self.console.is_terminal else None
        for text in break_phrases(phrases, width):
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)


class _Bar(Progress):
    """The bar on its own line, and below it the details, broken between phrases."""

    def __init__(self, describe, *columns, **kwargs) -> None:
        self.describe = describe  # before Progress.__init__, which renders once
        super().__init__(*columns, **kwargs)

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        for line in self.describe():
            yield Text(line, no_wrap=True, overflow="ellipsis")


def print_summary(manifest: dict, output: str, console: Console | None = None) -> None:
    """The closing summary: a table of operators on a terminal wide enough for it, one line per
    operator elsewhere; no line breaks inside a phrase."""
    console = console or Console()
    width = console.width if console.is_terminal else None

    def say(phrases: list[str]) -> None:
        for text in break_phrases(phrases, width):
            console.print(text, markup=False, highlight=False, soft_wrap=True)

    say([f"bricks-dj: {manifest['samples']['total']} samples in {len(manifest['shards'])} shards",
         f"{manifest['elapsed_seconds']:.1f}s"])
    table = ops_table(manifest)
    unbounded = console.options.update_width(sys.maxsize)  # within its own width, any table measures as fitting
    if width is not None and Measurement.get(console, unbounded, table).maximum <= width:
        console.print(table)
    else:
        for op in manifest["ops"]:
            say([f"{op['index']} {op['name']}: {op['in']} in", f"{op['out']} out", f"{op['dropped']} dropped",
                 f"{op['failed']} failed", f"{op['seconds']:.2f}s"])
    s = manifest["sources"]
    say([f"sources: {s['total']}", f"{s['kept']} kept", f"{s['dropped']} dropped", f"{s['failed']} failed",
         *([f"{s['skipped_as_done']} done before"] if s["skipped_as_done"] else [])])
    say([f"frames decoded: {manifest['decode']['frames']}"])
    say([f"output: {output}"])


def ops_table(manifest: dict) -> Table:
    table = Table()
    for column in ("#", "operator", "in", "out", "dropped", "failed", "seconds"):
        table.add_column(column, justify="left" if column == "operator" else "right", no_wrap=True)
    for op in manifest["ops"]:
        table.add_row(str(op["index"]), op["name"], str(op["in"]), str(op["out"]), str(op["dropped"]),
                      str(op["failed"]), f"{op['seconds']:.2f}")
    return table
