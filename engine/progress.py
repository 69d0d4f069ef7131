"""Progress while a recipe runs: a live bar on a terminal, plain periodic lines otherwise,
and a closing summary table."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .run import SourceDone


class RunProgress:
    def __init__(self, console: Console | None = None, interval: float = 10.0) -> None:
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self.interval = interval
        self.kept = self.rejected = self.frames = self.done = self.failed = 0
        self.total = 0
        self._bar: Progress | None = None
        self._task = None
        self._started = time.monotonic()
        self._last_line = self._started

    def start(self, total: int, already_done: int) -> None:
        self.total = total - already_done
        if already_done:
            self.console.print(f"resuming: {already_done} of {total} sources already done")
        if self.live:
            self._bar = Progress(TextColumn("[bold]sources"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.console)
            self._bar.start()
            self._task = self._bar.add_task("run", total=self.total, detail="")
        else:
            self.console.print(f"processing {self.total} sources")

    def source(self, done: SourceDone) -> None:
        self.done += 1
        self.kept += done.kept
        self.rejected += done.rejected
        self.frames += done.frames
        self.failed += done.status == "failed"
        elapsed = max(time.monotonic() - self._started, 1e-9)
        detail = f"{self.kept} samples kept, {self.rejected} rejected, {self.frames / elapsed:.0f} frames/s"
        if self._bar is not None:
            self._bar.update(self._task, advance=1, detail=detail)
        elif time.monotonic() - self._last_line >= self.interval or self.done == self.total:
            self._last_line = time.monotonic()
            eta = (self.total - self.done) * elapsed / self.done
            self.console.print(f"{self.done}/{self.total} sources, {detail}, eta {eta:.0f}s")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def summary_table(manifest: dict) -> Table:
    table = Table(title=f"bricks-dj: {manifest['samples']['total']} samples in {len(manifest['shards'])} shards "
                        f"({manifest['elapsed_seconds']:.1f}s)")
    for column in ("#", "operator", "in", "out", "dropped", "failed", "seconds"):
        table.add_column(column, justify="left" if column == "operator" else "right")
    for op in manifest["ops"]:
        table.add_row(str(op["index"]), op["name"], str(op["in"]), str(op["out"]), str(op["dropped"]),
                      str(op["failed"]), f"{op['seconds']:.2f}")
    s = manifest["sources"]
    table.caption = (f"sources: {s['total']} ({s['kept']} kept, {s['dropped']} dropped, {s['failed']} failed"
                     f"{', ' + str(s['skipped_as_done']) + ' done before' if s['skipped_as_done'] else ''}); "
                     f"frames decoded: {manifest['decode']['frames']}")
    return table

