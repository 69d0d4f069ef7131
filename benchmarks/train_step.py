"""Benchmark: where a training step's time goes (data wait, encode, forward/backward, optimizer).

Runs `bricks-train` in process for `--steps` steps and reads back its metrics: the mean of
each phase per step after `--warmup` steps, its share of the step, and samples/s. The shares
are ratios within one run, so they compare across machines; the seconds do not.

Default: the tiny CPU config on shards that it makes from a generated corpus (320x180 brick
films through `bricks-dj` with the tiny captioner), the tiny STDiT2 at 144p. On a GPU, the
Text2Bricks 32-frame config with an XL/2 of random weights (there are no real ones here) and
the tiny encoders:

    python benchmarks/train_step.py
    python benchmarks/train_step.py --config text2bricks-360p-32f --data SHARDS \\
        --set model.tiny=true --set model.ckpt=null \\
        --set "model.config={depth: 28, hidden_size: 1152, num_heads: 16, caption_channels: 4096}" \\
        --set logging.tensorboard=false --set sampling.every=0
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bricks.engine.recipe import from_dict
from bricks.engine.run import run
from bricks.common.synthetic import generate_corpus
from bricks.train.config import load_config
from bricks.train.metrics import read_metrics
from bricks.train.trainer import RunOptions, train

PHASES = ["data_wait", "encode", "fwd_bwd", "optim"]


def make_shards(workdir: Path, videos: int, extra_steps: tuple[dict, ...] = (), name: str = "shards") -> Path:
    """Captioned shards of generated films in WORKDIR/NAME (kept between runs); `extra_steps` follow
    the caption step."""
    out = workdir / name
    if (out / "manifest.json").exists():
        return out
    generate_corpus(workdir / "videos", num_videos=videos, seed=0)
    run(from_dict({
        "input": str(workdir / "videos"), "output": str(out), "executor": {"mode": "local"},
        "process": [{"shot_split": {"min_scene_len": 15}}, {"clip_length": {"min_frames": 15, "max_frames": 60}},
                    {"middle_frame": {}}, {"encode_clips": {}},
                    {"vlm_caption": {"backend": "transformers", "preset": "tiny", "device": "cpu", "batch_size": 8,
                                     "max_new_tokens": 6}}, *extra_steps]}), overwrite=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny-cpu")
    parser.add_argument("--data", help="Shards (default: generate them)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bricks-train-bench-"))
    data = args.data or str(make_shards(workdir, args.videos))
    overrides = ["train.log_every=1", f"train.ckpt_every={10**9}", *args.overrides]
    config = load_config(args.config, overrides)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    train(config, RunOptions(data=[data], output=run_dir, max_steps=args.steps))

    rows = [m for m in read_metrics(run_dir / "metrics.jsonl") if m["step"] > args.warmup]
    if not rows:
        sys.exit(f"no steps after the {args.warmup} warm-up steps: raise --steps")
    step = sum(m["step_time"] for m in rows) / len(rows)
    samples = sum(m["samples"] for m in rows)
    result = {"config": args.config, "steps": len(rows), "step_s": step,
              "samples_per_s": samples / sum(m["step_time"] for m in rows)}
    print(f"{args.config}: {len(rows)} steps after {args.warmup} warm-up, {step:.3f} s per step, "
          f"{result['samples_per_s']:.2f} samples/s")
    for phase in PHASES:
        mean = sum(m[phase] for m in rows) / len(rows)
        result[phase] = mean
        print(f"  {phase:<10} {mean:8.4f} s  {mean / step:6.1%} of the step")
    if "gpu_mem_gb" in rows[-1]:
        print(f"  peak GPU memory {rows[-1]['gpu_mem_gb']:.1f} GiB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
