"""Benchmark: one CPU filtering recipe three ways on the same generated corpus.

  (a) `dj-process` with Data-Juicer's own operators: video_duration_filter,
      video_resolution_filter, video_aspect_ratio_filter, video_motion_score_filter;
  (b) the same operators and parameters as `dj.<op>` steps of a `bricks-dj run --local` recipe;
  (c) `bricks-dj run --local` with bricks' own equivalents: duration_filter, resolution_filter,
      motion_filter (bricks has no aspect-ratio filter: that step is left out).

Every figure is the whole command started as a subprocess (start-up and imports included, as a
user sees them); each way runs `--rounds` times, interleaved, and the median is shown with its
ratio against (a), the samples each kept, and the command. Samples are whole videos in all three
(no shot splitting: Data-Juicer's own splitter needs the ffmpeg command). The motion scores are
not on the same scale (Data-Juicer's flow runs on full-size frames, bricks' on 128-px ones), so
the same `min_score` may keep different videos.

The corpus: `--videos` brick films from `bricks.common.synthetic` (3-5 shots each, 12-20 s at
24 fps, 320x180), plus one static, one 0.5 s long and one 160x90 video, which the filters drop.

    python benchmarks/dj_side_by_side.py [--videos N] [--rounds R] [--np P] [--workdir DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from bricks.common.synthetic import ShotSpec, generate_corpus, write_video

BIN = Path(sys.executable).parent
MIN_DURATION, MIN_WIDTH, MIN_HEIGHT, MIN_MOTION = 1.0, 256, 144, 0.25

DJ_OPS = [
    {"video_duration_filter": {"min_duration": MIN_DURATION, "video_backend": "av"}},
    {"video_resolution_filter": {"min_width": MIN_WIDTH, "min_height": MIN_HEIGHT}},
    {"video_aspect_ratio_filter": {"min_ratio": "1/2", "max_ratio": "2/1"}},
    {"video_motion_score_filter": {"min_score": MIN_MOTION, "sampling_fps": 2}},
]
BRICKS_OPS = [
    {"duration_filter": {"min_duration": MIN_DURATION}},
    {"resolution_filter": {"min_width": MIN_WIDTH, "min_height": MIN_HEIGHT}},
    {"motion_filter": {"min_score": MIN_MOTION, "sampling_fps": 2}},
]
WAYS = ("a", "b", "c")
TITLES = {"a": "dj-process, Data-Juicer's ops", "b": "bricks-dj, the same ops as dj.<op>",
          "c": "bricks-dj, bricks' own ops"}


def make_corpus(folder: Path, videos: int) -> list[Path]:
    generate_corpus(folder, num_videos=videos, seed=0)
    write_video(folder / "static.mp4", [ShotSpec(120, static=True)])
    write_video(folder / "short.mp4", [ShotSpec(12, seed=1)])
    write_video(folder / "small.mp4", [ShotSpec(60, seed=2)], width=160, height=90)
    return sorted(folder.glob("*.mp4"))


def prepare(work: Path, files: list[Path], np_: int) -> dict[str, list[str]]:
    """Each way's recipe written into `work`; the command of each (outputs go to work/out-<way>)."""
    jsonl = work / "videos.jsonl"
    jsonl.write_text("".join(json.dumps({"videos": [str(f)], "text": "<__dj__video> a brick film <|__dj__eoc|>"})
                             + "\n" for f in files))
    dj = {"project_name": "side_by_side", "dataset_path": str(jsonl), "export_path": str(work / "out-a" / "result.jsonl"),
          "np": np_, "process": DJ_OPS}
    (work / "a.yaml").write_text(yaml.safe_dump(dj, sort_keys=False))
    for way, process in (("b", [{f"dj.{k}": v} for op in DJ_OPS for k, v in op.items()]), ("c", BRICKS_OPS)):
        recipe = {"input": str(files[0].parent), "output": str(work / f"out-{way}"), "executor": {"mode": "local"},
                  "process": process}
        (work / f"{way}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return {"a": [str(BIN / "dj-process"), "--config", str(work / "a.yaml")],
            "b": [str(BIN / "bricks-dj"), "run", str(work / "b.yaml"), "--local"],
            "c": [str(BIN / "bricks-dj"), "run", str(work / "c.yaml"), "--local"]}


def kept(work: Path, way: str) -> int:
    if way == "a":
        return len((work / "out-a" / "result.jsonl").read_text().splitlines())
    return sum(pq.read_metadata(f).num_rows for f in glob.glob(str(work / f"out-{way}" / "shards" / "*.parquet")))


def run_once(work: Path, way: str, command: list[str]) -> float:
    shutil.rmtree(work / f"out-{way}", ignore_errors=True)
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=work)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"({way}) {' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    files = make_corpus(work / "videos", args.videos)
    commands = prepare(work, files, args.np)
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(args.rounds):
        for way in WAYS:
            times[way].append(run_once(work, way, commands[way]))
    result = {"videos": len(files), "rounds": args.rounds, "np": args.np, "ways": {}}
    base = statistics.median(times["a"])
    for way in WAYS:
        median = statistics.median(times[way])
        result["ways"][way] = {"title": TITLES[way], "seconds": [round(t, 2) for t in times[way]],
                               "median_s": round(median, 2), "ratio_to_a": round(median / base, 2),
                               "kept": kept(work, way), "command": " ".join(commands[way])}
    return result


def report(result: dict[str, Any]) -> None:
    print(f"{result['videos']} videos, median of {result['rounds']} round(s), Data-Juicer np={result['np']}")
    print(f"{'':4}{'way':38}{'median s':>10}{'x (a)':>8}{'kept':>6}")
    for way, r in result["ways"].items():
        print(f"({way}) {r['title']:38}{r['median_s']:>10.2f}{r['ratio_to_a']:>8.2f}{r['kept']:>6}")
    for way, r in result["ways"].items():
        print(f"({way}) {r['command']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=5, help="brick films besides the three the filters drop")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--np", type=int, default=2, help="Data-Juicer's processes in (a)")
    p.add_argument("--workdir", type=Path, help="keep the corpus, recipes and outputs here (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workdir is not None:
        if args.workdir.exists() and any(args.workdir.iterdir()):
            raise SystemExit(f"--workdir {args.workdir}: not empty (the benchmark writes and replaces its outputs there)")
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = measure(args, args.workdir.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="dj-side-by-side-") as tmp:
            result = measure(args, Path(tmp))
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
