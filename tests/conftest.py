"""Shared fixtures: a small synthetic corpus with known cuts, bad inputs, recipe helpers."""

from __future__ import annotations

import glob
import json
import shutil
import socket
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from bricks.common.synthetic import ShotSpec, generate_corpus, write_video

from s3_server import s3, s3_server  # noqa: F401 (fixtures: a local S3 endpoint and a bucket on it)

CPU_PROCESS = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "brickfilm_cpu.yaml").read_text())["process"]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[Path, list]:
    """Three 320x180 brick films: one with a 260-frame shot, one ending in a 10-frame shot,
    static shots in some."""
    folder = tmp_path_factory.mktemp("corpus")
    truths = generate_corpus(folder, num_videos=3, seed=0)
    return folder, truths


@pytest.fixture(scope="session")
def bad_inputs(tmp_path_factory, corpus) -> dict[str, Path]:
    """One file per kind of bad input, each beside a good video."""
    folder = tmp_path_factory.mktemp("bad")
    good = Path(corpus[1][1].path)
    files = {"good": folder / "good.mp4"}
    shutil.copy(good, files["good"])
    files["zero_byte"] = folder / "empty.mp4"
    files["zero_byte"].write_bytes(b"")
    files["not_video"] = folder / "notes.mp4"
    files["not_video"].write_text("this is a text file, not a video\n" * 20)
    files["audio_only"] = folder / "tone.m4a"
    _write_audio_only(files["audio_only"])
    data = good.read_bytes()
    files["truncated"] = folder / "truncated.mp4"  # moov atom at the end is lost
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["corrupt"] = folder / "corrupt.mp4"  # garbage in the middle of the media data
    rng = np.random.default_rng(0)
    middle = len(data) // 3
    files["corrupt"].write_bytes(data[:middle] + rng.integers(0, 256, len(data) // 3, dtype=np.uint8).tobytes()
                                 + data[middle + len(data) // 3:])
    return files


def _write_audio_only(path: Path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = (np.sin(np.arange(16000) / 16000 * 2 * np.pi * 440) * 0.3).astype(np.float32)
        frame_size = stream.codec_context.frame_size or 1024
        for start in range(0, len(samples) - frame_size, frame_size):
            frame = av.AudioFrame.from_ndarray(samples[None, start:start + frame_size], format="fltp", layout="mono")
            frame.sample_rate = 16000
            frame.pts = start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def write_recipe(folder: Path, process: list, *, input, output=None, executor=None, **extra) -> Path:
    recipe = {"input": [str(i) for i in input] if isinstance(input, list) else str(input),
              "output": str(output or folder / "out"), "executor": {"mode": "local", **(executor or {})},
              "process": process, **extra}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def read_shards(out: Path) -> pa.Table:
    files = sorted(glob.glob(str(out / "shards" / "*.parquet")))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


def read_rejects(out: Path) -> pa.Table:
    files = sorted(glob.glob(str(out / "rejects" / "*.parquet")))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


def read_manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def free_port(host: str = "127.0.0.1") -> int:
    """A port where nothing listens on `host` ("" for every interface)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def short_video(path: Path, shots=((30, False), (30, False)), **kwargs):
    return write_video(path, [ShotSpec(n, static=s, seed=i) for i, (n, s) in enumerate(shots)], **kwargs)


def _run_caption_recipe(corpus_dir: Path, out: Path, encode: bool) -> Path:
    from bricks.engine.recipe import from_dict
    from bricks.engine.run import run

    process = [{"shot_split": {"min_scene_len": 15}}, {"clip_length": {"min_frames": 15, "max_frames": 60}},
               {"middle_frame": {}}]
    if encode:
        process.append({"encode_clips": {}})
    process.append({"vlm_caption": {"backend": "transformers", "preset": "tiny", "device": "cpu", "batch_size": 8,
                                    "max_new_tokens": 6}})
    run(from_dict({"input": str(corpus_dir), "output": str(out), "executor": {"mode": "local"}, "process": process}))
    return out


@pytest.fixture(scope="session")
def brick_shards(tmp_path_factory, corpus) -> Path:
    """`bricks-dj` output over the synthetic corpus: captioned clips (MP4 in `media`) and images."""
    pytest.importorskip("transformers")
    return _run_caption_recipe(corpus[0], tmp_path_factory.mktemp("shards") / "out", encode=True)


@pytest.fixture(scope="session")
def reference_shards(tmp_path_factory, corpus) -> Path:
    """The same in reference mode: clips point at their source files (`path`)."""
    pytest.importorskip("transformers")
    return _run_caption_recipe(corpus[0], tmp_path_factory.mktemp("refshards") / "out", encode=False)
