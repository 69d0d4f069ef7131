"""Frames decoded so far in each source in flight, for the progress display.

The decode loop counts its frames (`frame_counter`) and reports them at most once a second to
the board of the run it works for: the `FrameBoard` itself in-process, a `FrameBoard` actor from
Ray workers (a message a second per source, sent without waiting for an answer, and a last one
at the end of each source that is waited for). The driver mirrors the actor's board into its
own, which the display reads.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

log = logging.getLogger("bricks")

REPORT_EVERY_S = 1.0
CLOCK_EVERY_FRAMES = 16  # the clock is read once per this many frames, not per frame
MIRROR_EVERY_S = 1.0


@dataclass(frozen=True)
class InFlight:
    uri: str
    frames: int
    expected: int  # the container's estimate of the source's frames; 0 when it has none


class FrameBoard:
    """Per source in flight, the frames decoded so far; and per source ever reported, the most
    frames it reported. Thread-safe; also the body of the actor that Ray workers report to."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight: dict[str, InFlight] = {}
        self._reported: dict[str, int] = {}

    def update(self, uri: str, frames: int, expected: int) -> None:
        with self._lock:
            self._in_flight[uri] = InFlight(uri, frames, expected)
            self._reported[uri] = max(frames, self._reported.get(uri, 0))

    def finish(self, uri: str) -> None:
        with self._lock:
            self._in_flight.pop(uri, None)

    def in_flight(self) -> list[InFlight]:
        with self._lock:
            return list(self._in_flight.values())

    def reported(self) -> dict[str, int]:
        with self._lock:
            return dict(self._reported)

    def state(self) -> tuple[list[InFlight], dict[str, int]]:
        with self._lock:
            return list(self._in_flight.values()), dict(self._reported)

    def load(self, state: tuple[list[InFlight], dict[str, int]]) -> None:
        in_flight, reported = state
        with self._lock:
            self._in_flight = {item.uri: item for item in in_flight}
            self._reported = dict(reported)


class Sink(Protocol):
    def update(self, uri: str, frames: int, expected: int) -> None: ...
    def finish(self, uri: str) -> None: ...


class ActorSink:
    """Reports to a `FrameBoard` actor, waiting only for the last report of each source."""

    def __init__(self, actor) -> None:
        self.actor = actor

    def update(self, uri: str, frames: int, expected: int) -> None:
        self.actor.update.remote(uri, frames, expected)

    def finish(self, uri: str) -> None:
        # Waited for: a caller's calls run in order on the actor, so once this one has, so have
        # the source's updates, before its results (and the driver's last copy) can follow.
        import ray

        try:
            ray.get(self.actor.finish.remote(uri), timeout=30)
        except (ray.exceptions.RayError, TimeoutError) as exc:  # the display shows less; the run goes on
            log.debug("frame counts for %s not delivered: %s", uri, exc)


_sink: ContextVar[Sink | None] = ContextVar("bricks_frame_sink", default=None)


@contextlib.contextmanager
def reporting(sink: Sink | None, uri: str) -> Iterator[None]:
    """While processing `uri` on this thread, frame counts go to `sink` (None: nowhere)."""
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)
        if sink is not None:
            sink.finish(uri)


def frame_counter(uri: str, expected: int) -> Callable[[int], None]:
    """What the decode loop calls with the number of frames decoded so far."""
    sink = _sink.get()
    if sink is None:
        return _ignore
    return _Counter(sink, uri, expected)


def _ignore(frames: int) -> None:
    pass


class _Counter:
    def __init__(self, sink: Sink, uri: str, expected: int) -> None:
        self.sink, self.uri, self.expected = sink, uri, expected
        self.due = 0.0

    def __call__(self, frames: int) -> None:
        if frames % CLOCK_EVERY_FRAMES:
            return
        now = time.monotonic()
        if now >= self.due:
            self.due = now + REPORT_EVERY_S
            self.sink.update(self.uri, frames, self.expected)


@contextlib.contextmanager
def mirrored_from_ray(board: FrameBoard | None) -> Iterator[Sink | None]:
    """For a Ray run: a `FrameBoard` actor for the workers to report to (its sink is yielded),
    copied into `board` every second and once more at the end."""
    if board is None:
        yield None
        return
    import ray

    actor = ray.remote(num_cpus=0)(FrameBoard).remote()
    stop = threading.Event()

    def mirror() -> None:
        while not stop.wait(MIRROR_EVERY_S):
            _copy(actor, board)

    thread = threading.Thread(target=mirror, name="bricks-frames", daemon=True)
    thread.start()
    try:
        yield ActorSink(actor)
    finally:
        stop.set()
        thread.join()
        # Every source is done by now, though a worker's last `finish` may still be on its way
        # to the actor (messages from different processes are not ordered): none is in flight.
        _copy(actor, board, run_over=True)
        ray.kill(actor)


def _copy(actor, board: FrameBoard, run_over: bool = False) -> None:
    import ray

    try:
        in_flight, reported = ray.get(actor.state.remote(), timeout=30)
        board.load(([] if run_over else in_flight, reported))
    except (ray.exceptions.RayError, TimeoutError) as exc:  # the display shows less; the run goes on
        log.debug("frame counts from Ray workers unavailable: %s", exc)
