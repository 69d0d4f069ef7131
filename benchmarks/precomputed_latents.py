"""Benchmark: stored latents (`encode_latents`) against encoding on the fly, in bytes and in training speed.

Makes shards from a generated corpus (320x180 brick films through `bricks-dj` with the tiny
captioner and `encode_latents: {config: tiny-cpu}`), then, in this one process:

- bytes per sample: `vae_latent` + `t5_states` against `media` (H.264 clips, JPEG images);
- training speed: `bricks-train --config tiny-cpu` for `--steps` steps on those shards, and on
  the same shards without the latent columns with the same crop and posterior (the same
  batches and draws), as steps/s after `--warmup` steps and their ratio.

Both runs use the tiny random VAE and T5, whose cost is small next to a real VAE's and
T5-XXL's, so the speed-up here is a floor. Ratios compare across machines; seconds do not.

    python benchmarks/precomputed_latents.py
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from bricks.train.config import load_config
from bricks.train.latents import LATENT_COLUMNS
from bricks.train.metrics import read_metrics
from bricks.train.trainer import RunOptions, train
from train_step import make_shards  # this folder's training benchmark: its captioned shards

ENCODE = {"encode_latents": {"config": "tiny-cpu", "device": "cpu", "batch_size": 8}}


def strip_latents(out: Path, folder: Path) -> Path:
    """The same shards, row group for row group, without encode_latents' columns."""
    folder.mkdir(exist_ok=True)
    for path in sorted(glob.glob(str(out / "shards" / "*.parquet"))):
        parquet = pq.ParquetFile(path)
        groups = [parquet.read_row_group(g).drop_columns(list(LATENT_COLUMNS))
                  for g in range(parquet.metadata.num_row_groups)]
        with pq.ParquetWriter(folder / os.path.basename(path), groups[0].schema) as writer:
            for group in groups:
                writer.write_table(group)
    return folder


def bytes_per_sample(out: Path) -> None:
    rows = pq.read_table(glob.glob(str(out / "shards" / "*.parquet")),
                         columns=["kind", "media", "vae_latent", "t5_states", "vae_latent_shape"]).to_pylist()
    for kind in ("video", "image"):
        mine = [r for r in rows if r["kind"] == kind and r["vae_latent"] is not None]
        if not mine:
            continue
        media = sum(len(r["media"]) for r in mine) / len(mine)
        latent = sum(len(r["vae_latent"]) for r in mine) / len(mine)
        states = sum(len(r["t5_states"] or b"") for r in mine) / len(mine)
        print(f"{kind}: {len(mine)} samples, latent {mine[0]['vae_latent_shape']}: media {media:,.0f} B, "
              f"latent {latent:,.0f} B + T5 states {states:,.0f} B = {(latent + states) / media:.2f}x the media")


def steps_per_second(data: Path, run_dir: Path, steps: int, warmup: int, overrides: list[str]) -> float:
    config = load_config("tiny-cpu", ["logging.tensorboard=false", "train.ckpt_every=100000", *overrides])
    train(config, RunOptions(data=[str(data)], output=run_dir, max_steps=steps))
    times = [m["step_time"] for m in read_metrics(run_dir / "metrics.jsonl")][warmup:]
    return len(times) / sum(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bricks-latents-"))
    out = make_shards(workdir, args.videos, (ENCODE,), name="latent-shards")
    plain = strip_latents(out, workdir / "plain")
    bytes_per_sample(out)
    same = ["data.temporal_crop=center", "model.vae_posterior=mean"]
    stored = steps_per_second(out, workdir / "run-stored", args.steps, args.warmup, [])
    on_the_fly = steps_per_second(plain, workdir / "run-on-the-fly", args.steps, args.warmup, same)
    print(f"tiny-cpu training, {args.steps - args.warmup} steps each: stored latents {stored:.2f} steps/s, "
          f"encoding on the fly {on_the_fly:.2f} steps/s: {stored / on_the_fly:.2f}x")


if __name__ == "__main__":
    main()
