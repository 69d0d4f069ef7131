"""Benchmark: a what-if threshold by `bricks-dj refilter` against re-running the recipe.

The recipe is the demo's (`recipes/brickfilm.yaml` with `bricks-dj demo`'s overrides: tiny
models on CPU, in-process) over N synthetic brick films (default 6). It runs once; then, in
interleaved rounds, the same new threshold is answered both ways, each a whole command started
as a subprocess:

  (a) `bricks-dj run ... --set KEY=VALUE --local` into a new folder;
  (b) `bricks-dj refilter OUT --set KEY=VALUE --to DIR`.

KEY=VALUE is `--change` (default `process.motion_filter.min_score=3.5`: motion_filter runs
before middle_frame, so each clip it now drops takes its image along).

Both write a full output with its report (the report decodes its thumbnails in both). The table
shows the median wall time of each and (a)/(b); the two outputs must keep the same samples.

    python benchmarks/refilter_vs_rerun.py [--videos N] [--change KEY=VALUE] [--rounds R] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "bricks.engine.cli"]


def timed_command(args: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - started


def kept(out: Path) -> list[tuple]:
    manifest = json.loads((out / "manifest.json").read_text())
    rows = []
    for shard in manifest["shards"]:
        table = pq.read_table(out / shard["file"], columns=["source_uri", "kind", "start_frame", "end_frame"])
        rows += [tuple(r.values()) for r in table.to_pylist()]
    return sorted(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=6)
    parser.add_argument("--change", default="process.motion_filter.min_score=3.5",
                        help="the new threshold, as refilter's --set takes it")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()

    from bricks.common.synthetic import generate_corpus
    from bricks.engine.cli import DEMO_OVERRIDES

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bricks-refilter-bench-"))
    videos = work / "videos"
    if not (videos / "truth.json").exists():
        generate_corpus(videos, num_videos=args.videos)
    recipe = str(ROOT / "recipes" / "brickfilm.yaml")
    sets = [a for o in DEMO_OVERRIDES for a in ("--set", o)]
    change = args.change
    original = work / "out"
    shutil.rmtree(original, ignore_errors=True)
    first = timed_command([*CLI, "run", recipe, "--local", "--set", f"input={videos}", "--set",
                           f"output={original}", *sets])
    print(f"original run: {first:.1f} s ({args.videos} videos)")

    rerun_s, refilter_s = [], []
    for k in range(args.rounds):
        rerun, what = work / f"rerun-{k}", work / f"whatif-{k}"
        shutil.rmtree(rerun, ignore_errors=True)
        shutil.rmtree(what, ignore_errors=True)
        rerun_s.append(timed_command([*CLI, "run", recipe, "--local", "--set", f"input={videos}", "--set",
                                      f"output={rerun}", *sets, "--set", change]))
        refilter_s.append(timed_command([*CLI, "refilter", str(original), "--set", change, "--to", str(what)]))
        if kept(rerun) != kept(what):
            raise SystemExit(f"round {k}: refilter kept other samples than the re-run")
    a, b = statistics.median(rerun_s), statistics.median(refilter_s)
    print(f"{'answer to --set ' + change:52s} {'median s':>9s} {'vs refilter':>12s}")
    print(f"{'(a) bricks-dj run (re-run the recipe)':52s} {a:9.2f} {a / b:11.2f}x")
    print(f"{'(b) bricks-dj refilter --to':52s} {b:9.2f} {1.0:11.2f}x")
    print(f"kept samples: {len(kept(original))} before, {len(kept(work / 'whatif-0'))} with the new threshold "
          "(the same in both)")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
