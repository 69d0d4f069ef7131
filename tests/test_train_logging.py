"""What a person looks at during training: the fixed-seed sample videos and the throughput per
bucket, in TensorBoard (read back from the event files) and W&B (an offline run's .wandb file),
agreeing with metrics.jsonl."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from PIL import Image  # noqa: E402

from bricks.model.aspect import frame_size  # noqa: E402
from bricks.train.checkpoint import checkpoints  # noqa: E402
from bricks.train.cli import main as train_cli  # noqa: E402
from bricks.train.metrics import bucket_throughput, read_metrics  # noqa: E402

TINY = ["--config", "tiny-cpu"]
# tiny-cpu samples: 4 frames at 144p 16:9, conditioned on 24 fps, every 3rd frame (8 fps playback)
FRAMES, PLAYBACK_FPS = 4, 24 / 3
HEIGHT, WIDTH = frame_size("144p", "16:9")


def train(shards: Path, run: Path, *args: str):
    result = CliRunner().invoke(train_cli, [*TINY, "--data", str(shards), "--output", str(run), *args])
    assert result.exit_code == 0, result.output
    return read_metrics(run / "metrics.jsonl")


def gif_frames(data: bytes) -> list[int]:
    """The frame delays (ms) of a GIF."""
    gif = Image.open(io.BytesIO(data))
    assert gif.format == "GIF"
    delays = []
    for index in range(gif.n_frames):
        gif.seek(index)
        delays.append(gif.info["duration"])
    return delays


def test_bucket_throughput_sums_a_window_per_bucket():
    window = [{"bucket": "144p/8f/0.56", "rank_samples": 2, "step_time": 0.5},
              {"bucket": "144p/1f/0.56", "rank_samples": 4, "step_time": 0.25},
              {"bucket": "144p/8f/0.56", "rank_samples": 1, "step_time": 1.0}]
    assert bucket_throughput(window) == {
        "144p/1f/0.56": {"steps": 1, "samples": 4, "seconds": 0.25, "samples_per_s": 16.0, "steps_per_s": 4.0},
        "144p/8f/0.56": {"steps": 2, "samples": 3, "seconds": 1.5, "samples_per_s": 2.0, "steps_per_s": 2 / 1.5},
    }


def test_tensorboard_gets_sample_videos_and_per_bucket_throughput(brick_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    metrics = train(brick_shards, run, "--max-steps", "4", "--set", "sampling.every=2",
                    "--set", "train.log_every=2", "--set", "logging.tensorboard=true")
    assert [m["step"] for m in metrics] == [2, 4]
    for m in metrics:  # one process: the buckets' steps and samples are the window's
        assert sum(b["steps"] for b in m["throughput"].values()) == 2
        assert sum(b["samples"] for b in m["throughput"].values()) == m["samples"]
        assert all(key.startswith("144p/") for key in m["throughput"])

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert tags["images"] == ["samples/0"]
    videos = events.Images("samples/0")
    assert [v.step for v in videos] == [2, 4]
    for video in videos:
        assert (video.width, video.height) == (WIDTH, HEIGHT)
        delays = gif_frames(video.encoded_image_string)
        assert len(delays) == FRAMES
        assert all(abs(d - 1000 / PLAYBACK_FPS) <= 10 for d in delays)  # GIF delays are in 1/100 s
    prompt = events.Tensors("samples/0/prompt/text_summary")
    assert [p.step for p in prompt] == [2, 4]
    assert prompt[0].tensor_proto.string_val[0].decode() == "a red brick house on a green baseplate"
    # the MP4s that samples/ holds are the same renders
    assert [len(list(d.glob("0000-*.mp4"))) for d in sorted((run / "samples").iterdir())] == [1, 1]

    trained = {bucket for m in metrics for bucket in m["throughput"]}
    logged = {tag for tag in tags["scalars"] if tag.startswith("throughput/")}
    assert logged == {f"throughput/{b}/{rate}" for b in trained for rate in ("samples_per_s", "steps_per_s")}
    for bucket in trained:
        for rate in ("samples_per_s", "steps_per_s"):
            expected = {m["step"]: m["throughput"][bucket][rate] for m in metrics if bucket in m["throughput"]}
            got = {e.step: e.value for e in events.Scalars(f"throughput/{bucket}/{rate}")}
            assert got == pytest.approx(expected, rel=1e-6)
            assert all(v > 0 for v in got.values())
    assert {e.step: e.value for e in events.Scalars("train/samples_per_s")} == pytest.approx(
        {m["step"]: m["samples_per_s"] for m in metrics}, rel=1e-6)


def test_a_failing_backend_is_one_warning_and_the_run_goes_on(brick_shards, tmp_path, monkeypatch):
    import bricks.train.metrics as metrics_module

    def broken(*args, **kwargs):
        raise OSError("disk quota exceeded")

    monkeypatch.setattr(metrics_module, "image_summary", broken)
    run = tmp_path / "run"
    metrics = train(brick_shards, run, "--max-steps", "2", "--set", "sampling.every=1",
                    "--set", "logging.tensorboard=true")
    assert [m["step"] for m in metrics] == [1, 2]
    assert [c.step for c in checkpoints(run)] == [2]
    warnings = [line for line in (run / "train.log").read_text().splitlines() if "TensorBoard: logging" in line]
    assert len(warnings) == 1, warnings
    assert "samples at step 1 failed (OSError: disk quota exceeded)" in warnings[0]
    assert len(list((run / "samples").glob("step-*/0000-*.mp4"))) == 2  # the MP4s are still written
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert not events.Tags()["images"] and [e.step for e in events.Scalars("train/loss")] == [1, 2]


# --- W&B -------------------------------------------------------------------------------------------


def wandb_records(path: Path) -> list:
    """The records of a .wandb file: wandb's protobuf Records, in the LevelDB log format that
    wandb-core writes (a 7-byte header, 32 KiB blocks of chunks: CRC, length, type)."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pending, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B", f"{path} is not a .wandb file"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_has_the_sample_videos_and_throughput(brick_shards, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": tmp_path / "wandb", "WANDB_CONFIG_DIR":
                        tmp_path / "wandb-config", "WANDB_CACHE_DIR": tmp_path / "wandb-cache",
                        "WANDB_DATA_DIR": tmp_path / "wandb-data", "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, str(value))
    run = tmp_path / "run"
    metrics = train(brick_shards, run, "--max-steps", "2", "--set", "sampling.every=2",
                    "--set", "logging.wandb=true", "--set", "logging.tensorboard=false")
    (offline,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    history = {}
    for record in wandb_records(offline):
        if record.WhichOneof("record_type") == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            history[row["_step"]] = row
    assert sorted(history) == [1, 2]
    for m in metrics:
        row = history[m["step"]]
        assert row["train/loss"] == pytest.approx(m["loss"])
        assert row["train/samples_per_s"] == pytest.approx(m["samples_per_s"])
        assert m["throughput"]
        for bucket, rates in m["throughput"].items():
            assert row[f"throughput/{bucket}/samples_per_s"] == pytest.approx(rates["samples_per_s"])
            assert row[f"throughput/{bucket}/steps_per_s"] == pytest.approx(rates["steps_per_s"])
    video = history[2]
    assert video["samples/0/_type"] == "video-file"
    assert video["samples/0/caption"] == "a red brick house on a green baseplate"
    logged = offline.parent / "files" / video["samples/0/path"]
    (rendered,) = (run / "samples" / "step-00000002").glob("0000-*.mp4")
    assert logged.read_bytes() == rendered.read_bytes()
    assert "samples/0/_type" not in history[1]
