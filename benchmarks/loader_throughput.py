"""Benchmark: how many training clips per second the shard loader delivers.

1. Generate `--videos` synthetic 1280x720 brick films and run `bricks-dj` over them in
   process (shot split, clips of 15-200 frames, encode_clips at 720p, captions from the tiny
   VLM), so the shards hold MP4 clips as `recipes/brickfilm.yaml` writes them.
2. Baseline, in the same process: PyAV decode of every frame of every clip's MP4 bytes (one
   thread per clip, as the loader's workers do, no scaling).
3. `ShardDataset` with a 360p, 32-frame bucket (batch 1, `frame_interval` 2 as in the
   Text2Bricks 64-frame config: the synthetic shots are 20-260 frames, too short for the
   32-frame config's interval of 4) through a DataLoader with 1 and 2 workers: clips/s after
   the first batch (worker start-up left out), per worker, and the ratio of the loader's time
   per clip to the baseline's.

    python benchmarks/loader_throughput.py [--videos 8] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import av
import pyarrow.parquet as pq
from torch.utils.data import DataLoader

from bricks.engine.recipe import from_dict
from bricks.engine.run import run
from bricks.common.synthetic import generate_corpus
from bricks.train.buckets import Buckets
from bricks.train.loader import ShardDataset
from bricks.train.shards import ShardIndex

BUCKETS_32F = {"360p": {32: (1.0, 1)}}


def make_shards(workdir: Path, videos: int) -> Path:
    out = workdir / "out"
    if (out / "manifest.json").exists():
        return out
    generate_corpus(workdir / "videos", num_videos=videos, width=1280, height=720, seed=0)
    run(from_dict({
        "input": str(workdir / "videos"), "output": str(out), "executor": {"mode": "local"},
        "process": [{"shot_split": {"min_scene_len": 15}}, {"clip_length": {"min_frames": 15, "max_frames": 200}},
                    {"encode_clips": {"short_side": 720}},
                    {"vlm_caption": {"backend": "transformers", "preset": "tiny", "device": "cpu", "batch_size": 8,
                                     "max_new_tokens": 6}}]}), overwrite=True)
    return out


def decode_baseline(shards: Path) -> tuple[float, int]:
    table = pq.read_table(shards / "shards", columns=["media", "kind"])
    clips = [m for m, k in zip(table["media"].to_pylist(), table["kind"].to_pylist()) if k == "video"]
    start = time.perf_counter()
    frames = 0
    for media in clips:
        with av.open(io.BytesIO(media)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames += sum(1 for _ in container.decode(stream))
    return (time.perf_counter() - start) / len(clips), frames


def loader_rate(shards: Path, workers: int) -> tuple[float, int]:
    dataset = ShardDataset(ShardIndex.build(shards), Buckets(BUCKETS_32F, frame_interval=2), streams=max(workers, 1))
    clips, start = 0, None
    for batch in DataLoader(dataset, batch_size=None, num_workers=workers):
        if start is None:
            start = time.perf_counter()  # from the first batch on: worker start-up is not throughput
            continue
        clips += len(batch["sample_id"])
    return clips / (time.perf_counter() - start), clips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bricks-loader-"))
    shards = make_shards(workdir, args.videos)
    per_clip, frames = decode_baseline(shards)
    print(f"baseline: PyAV decode of every frame: {per_clip * 1000:.1f} ms per clip ({frames} frames)")
    print(f"{'workers':>8} {'clips':>6} {'clips/s':>8} {'per worker':>11} {'time/clip vs decode-all':>24}")
    for workers in (1, 2):
        rate, clips = loader_rate(shards, workers)
        print(f"{workers:>8} {clips:>6} {rate:>8.2f} {rate / workers:>11.2f} {1 / rate / per_clip:>23.2f}x")


if __name__ == "__main__":
    main()
