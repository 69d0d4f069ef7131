"""Where training meets the real world: damaged checkpoints, a full disk, shards without
captions or with missing source files, files that are not shards, and sampling a tiny run's
checkpoint. Each failure is one line with exit status 2, or a resume from what is sound."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from bricks.common.files import mount_point  # noqa: E402
from bricks.train import checkpoint  # noqa: E402
from bricks.train.checkpoint import checkpoints  # noqa: E402
from bricks.train.cli import main as train_cli  # noqa: E402
from bricks.train.metrics import read_metrics  # noqa: E402

TINY = ["--config", "tiny-cpu"]
EVERY_2 = ["--set", "train.ckpt_every=2"]
CKPT_FILES = ["model/model.safetensors", "optimizer.pt", "state.json"]


def train(data: Path, run: Path, *args: str):
    return CliRunner().invoke(train_cli, [*TINY, "--data", str(data), "--output", str(run), *args])


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("bricks-train: error:")]


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = error_lines(result.output)
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def losses(run: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(run / "metrics.jsonl")]


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def write_shard(table: pa.Table, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "part-00000.parquet")
    return folder


@pytest.fixture(scope="module")
def four_steps(brick_shards, tmp_path_factory) -> Path:
    """A tiny run stopped at step 4, with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("four") / "run"
    result = train(brick_shards, run, "--max-steps", "4", *EVERY_2)
    assert result.exit_code == 0, result.output
    assert [c.step for c in checkpoints(run)] == [2, 4]
    return run


@pytest.fixture(scope="module")
def six_steps(brick_shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("six") / "run"
    result = train(brick_shards, run, "--max-steps", "6", *EVERY_2)
    assert result.exit_code == 0, result.output
    return run


# --- damaged checkpoints -------------------------------------------------------------------------


@pytest.mark.parametrize("damaged", CKPT_FILES)
def test_resume_skips_a_damaged_latest_checkpoint(brick_shards, four_steps, six_steps, tmp_path, caplog, damaged):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    truncate(run / "checkpoints" / "step-00000004" / damaged)
    with caplog.at_level(logging.INFO, logger="bricks"):
        result = train(brick_shards, run, "--max-steps", "6", *EVERY_2, "--resume")
    assert result.exit_code == 0, result.output
    assert f"skipping the damaged checkpoint step-00000004: {damaged} is truncated" in caplog.text
    assert "resumed from step-00000002" in caplog.text
    # Steps 3 and 4 again, then 5 and 6: exactly what the uninterrupted run computed.
    assert losses(run) == losses(six_steps)
    assert [c.step for c in checkpoints(run)] == [4, 6] and checkpoint.verify(checkpoints(run)[0]) is None


def test_resume_with_every_checkpoint_damaged_is_one_line_naming_the_file(brick_shards, four_steps, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    truncate(run / "checkpoints" / "step-00000002" / "optimizer.pt")
    truncate(run / "checkpoints" / "step-00000004" / "state.json")
    result = train(brick_shards, run, "--max-steps", "6", "--resume")
    assert_one_line_error(result, f"{run / 'checkpoints' / 'step-00000004' / 'state.json'} is truncated",
                          "the 1 older checkpoint is damaged too")
    assert (run / "checkpoints" / "step-00000004" / "state.json").exists()  # nothing deleted


@pytest.mark.parametrize("damaged", [*CKPT_FILES, "ema/model.safetensors"])
def test_checkpoints_without_checksums_get_structural_checks(four_steps, tmp_path, damaged):
    """Checkpoints written before checksums.json existed: truncation still shows."""
    folder = tmp_path / "step-00000004"
    shutil.copytree(four_steps / "checkpoints" / "step-00000004", folder)
    (folder / checkpoint.CHECKSUMS).unlink()
    ckpt = checkpoint.Checkpoint(folder, 4)
    assert checkpoint.verify(ckpt) is None
    truncate(folder / damaged)
    damage = checkpoint.verify(ckpt)
    assert damage is not None and damage.file == damaged


def test_a_changed_byte_fails_the_checksum(four_steps, tmp_path):
    folder = tmp_path / "step-00000004"
    shutil.copytree(four_steps / "checkpoints" / "step-00000004", folder)
    weights = folder / "ema" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # same size, same header: only the checksum can tell
    weights.write_bytes(bytes(data))
    damage = checkpoint.verify(checkpoint.Checkpoint(folder, 4))
    assert damage is not None and damage.file == "ema/model.safetensors" and "SHA-256" in damage.reason


# --- a full disk ---------------------------------------------------------------------------------


def _full_disk_safetensors(real):
    def save_file(tensors, filename, *args, **kwargs):
        from safetensors import SafetensorError

        if "step-00000004" in filename:  # as safetensors reports ENOSPC (a tmpfs filled up shows exactly this)
            Path(filename).write_bytes(b"\0" * 100)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, *args, **kwargs)
    return save_file


def test_a_full_disk_stops_with_one_line_and_the_earlier_checkpoints_resume(brick_shards, six_steps, tmp_path,
                                                                            monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _full_disk_safetensors(safetensors.torch.save_file))
    run = tmp_path / "run"
    result = train(brick_shards, run, "--max-steps", "6", *EVERY_2)
    line = assert_one_line_error(result, "no space left on device", "step-00000004", "rerun with --resume")
    assert str(mount_point(run)) in line
    assert [c.step for c in checkpoints(run)] == [2] and checkpoint.verify(checkpoints(run)[0]) is None
    assert not list((run / "checkpoints").glob(".step-*"))  # the partial copy is gone, its space freed

    monkeypatch.undo()
    resumed = train(brick_shards, run, "--max-steps", "6", *EVERY_2, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert losses(run) == losses(six_steps)


def test_a_failed_optimizer_write_leaves_the_earlier_checkpoint(four_steps, tmp_path, monkeypatch):
    """torch.save writes into a file object, so a full disk is an OSError with its errno."""
    from bricks.model.stdit2 import STDiT2Config

    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    before = checkpoints(run)
    earlier = checkpoint.Checkpoint(before[-1].path, before[-1].step)
    weights = earlier.model_state()
    config = STDiT2Config.from_dict(json.loads((earlier.path / "model" / "config.json").read_text()))
    real = torch.save

    def full(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)  # the bytes go out...
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # ...and the last write finds the disk full

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(checkpoint.CheckpointError, match="no space left on device .*step-00000006.*--resume"):
        checkpoint.save(run, 6, config=config, model=weights, ema=weights, optimizer=earlier.optimizer_state(),
                        state=earlier.state, keep_last=1)
    assert [c.step for c in checkpoints(run)] == [c.step for c in before]  # keep_last=1 pruned nothing
    assert all(checkpoint.verify(c) is None for c in checkpoints(run))
    assert not list((run / "checkpoints").glob(".step-*"))


def test_a_full_disk_under_the_metrics_is_one_line(brick_shards, tmp_path, monkeypatch):
    from bricks.train.metrics import MetricsLog

    def write(self, step, values):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(MetricsLog, "write", write)
    run = tmp_path / "run"
    assert_one_line_error(train(brick_shards, run, "--max-steps", "2"),
                          f"no space left on device writing {run / 'metrics.jsonl'}", "rerun with --resume")


# --- what the shards hold ------------------------------------------------------------------------


def test_no_batch_says_which_rows_lack_captions_and_which_fit_no_bucket(brick_shards, tmp_path):
    table = pq.read_table(brick_shards / "shards")
    n = table.num_rows
    half = n // 2
    text = [None] * half + table["text"].to_pylist()[half:]
    table = table.set_column(table.schema.get_field_index("text"), "text", pa.array(text, pa.string()))
    for name, value in (("height", 64), ("width", 96)):  # 144p needs about 0.8 x 256x144 pixels
        column = [value] * n
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(column, pa.int64()))
    data = write_shard(table, tmp_path / "uncaptioned")
    result = train(data, tmp_path / "run", "--max-steps", "2")
    line = assert_one_line_error(result, f"of {n} rows", f"{half} have no caption", "add vlm_caption",
                                 f"{n - half} fit no bucket", "64x96", "0.8x 144p", "0 fit a bucket")
    assert "image" in line and "frames" in line


def test_missing_source_files_stop_the_run_before_training(reference_shards, tmp_path, monkeypatch):
    """Reference-mode rows with relative paths, run from another folder: every clip would be skipped."""
    table = pq.read_table(reference_shards / "shards")
    paths = table["path"].to_pylist()
    media = table["media"].to_pylist()
    root = Path(paths[0]).parent.parent  # the corpus folder's parent
    relative = [os.path.relpath(p, root) if p else p for p in paths]
    table = table.set_column(table.schema.get_field_index("path"), "path", pa.array(relative, pa.string()))
    data = write_shard(table, tmp_path / "relative")
    by_path = sum(1 for p, m, t in zip(relative, media, table["text"].to_pylist()) if p and m is None and t)
    assert by_path > 0

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = train(data, tmp_path / "run", "--max-steps", "2")
    assert_one_line_error(result, f"{by_path} of the", "cannot be read", "no such file",
                          f"current folder, {elsewhere}", "run bricks-dj again")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before any step

    monkeypatch.chdir(root)  # where the relative paths point from: they train
    done = train(data, tmp_path / "run2", "--max-steps", "2")
    assert done.exit_code == 0, done.output


def test_most_samples_undecodable_stops_the_run(brick_shards, tmp_path):
    """Every clip's media is corrupt: half the samples are lost, over data.max_skipped_fraction."""
    table = pq.read_table(brick_shards / "shards")
    media = [m if kind == "image" else b"\x00not an mp4" for m, kind in
             zip(table["media"].to_pylist(), table["kind"].to_pylist())]
    table = table.set_column(table.schema.get_field_index("media"), "media", pa.array(media, pa.binary()))
    data = write_shard(table, tmp_path / "bad")
    result = train(data, tmp_path / "run", "--max-steps", "30")
    line = assert_one_line_error(result, "samples tried by step 18 could not be decoded",  # the epoch's end
                                 "data.max_skipped_fraction=0.2", "undecodable video")
    skipped, tried = map(int, re.search(r"error: (\d+) of the (\d+) samples", line).groups())
    assert tried <= table.num_rows and 0.4 < skipped / tried < 0.6  # the clips: about half
    # Allowed explicitly, the same data trains through the epoch.
    allowed = train(data, tmp_path / "allowed", "--max-steps", "20", "--set", "data.max_skipped_fraction=0.6")
    assert allowed.exit_code == 0, allowed.output


def test_files_that_are_not_shards_are_one_line_naming_them(brick_shards, tmp_path):
    good = pq.read_table(brick_shards / "shards")
    shard = brick_shards / "shards" / "part-000000.parquet"

    cut = tmp_path / "cut"
    cut.mkdir()
    pq.write_table(good, cut / "part-00000.parquet")
    (cut / "part-00001.parquet").write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert_one_line_error(train(cut, tmp_path / "r1"), f"{cut / 'part-00001.parquet'}: not a readable Parquet file")

    text = tmp_path / "text"
    text.mkdir()
    (text / "part-00000.parquet").write_text("sample_id,kind\n")
    assert_one_line_error(train(text, tmp_path / "r2"), "part-00000.parquet: not a readable Parquet file")

    typed = good.set_column(good.schema.get_field_index("num_frames"), "num_frames",
                            pa.array([str(v) for v in good["num_frames"].to_pylist()], pa.string()))
    data = write_shard(typed, tmp_path / "typed")
    assert_one_line_error(train(data, tmp_path / "r3"), "column num_frames is string", "as an integer")


# --- sampling a tiny run's checkpoint ------------------------------------------------------------


def test_bricks_sample_tiny_with_ckpt_samples_that_checkpoint(four_steps, tmp_path):
    import numpy as np
    from PIL import Image

    from bricks.model.cli import main as sample_cli
    from bricks.model.sampling import SampleSpec, VideoSampler, to_uint8_frames
    from bricks.train.config import load_config
    from bricks.train.trainer import build_models

    ema = four_steps / "checkpoints" / "step-00000004" / "ema"
    args = ["--tiny", "--size", "64x64", "--num-frames", "1", "--steps", "3", "--seed", "5", "a red brick"]
    runner = CliRunner()
    sampled = runner.invoke(sample_cli, [*args, "--ckpt", str(ema), "-o", str(tmp_path / "ckpt")])
    assert sampled.exit_code == 0, sampled.output
    noise = runner.invoke(sample_cli, [*args, "-o", str(tmp_path / "noise")])
    assert noise.exit_code == 0, noise.output
    (png,) = (tmp_path / "ckpt").glob("*.png")
    (noise_png,) = (tmp_path / "noise").glob("*.png")
    pixels = np.asarray(Image.open(png))

    # The trainer's own tiny encoders (seed 42 of tiny-cpu) and the EMA weights give that image.
    config = load_config("tiny-cpu", [])
    models = build_models(config.model, str(ema), torch.device("cpu"), torch.float32, config.train.seed)
    sampler = VideoSampler(models.model.eval(), models.vae, models.text_encoder)
    video = sampler.generate(["a red brick"], SampleSpec(num_frames=1, height=64, width=64, steps=3, seed=5))
    assert np.array_equal(pixels, to_uint8_frames(video[0])[0])
    assert not np.array_equal(pixels, np.asarray(Image.open(noise_png)))  # not the random STDiT2

    loaded = VideoSampler.tiny(ckpt=ema)
    for ours, theirs in ((loaded.vae, models.vae), (loaded.text_encoder.model, models.text_encoder.model)):
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), name


def test_bricks_sample_tiny_ckpt_refuses_what_is_not_a_tiny_checkpoint(four_steps, tmp_path):
    from bricks.model.cli import main as sample_cli

    step = four_steps / "checkpoints" / "step-00000004"
    bare = tmp_path / "bare"
    shutil.copytree(step / "ema", bare)
    args = ["--tiny", "--size", "64x64", "--num-frames", "1", "--steps", "2", "-o", str(tmp_path / "out"), "x"]
    result = CliRunner().invoke(sample_cli, [*args, "--ckpt", str(bare)])
    assert result.exit_code == 2 and "state.json gives the seed of the tiny encoders" in result.output

    real = tmp_path / "step"
    shutil.copytree(step, real)
    state = json.loads((real / "state.json").read_text())
    state["config"]["model"]["tiny"] = False
    (real / "state.json").write_text(json.dumps(state))
    result = CliRunner().invoke(sample_cli, [*args, "--ckpt", str(real / "ema")])
    assert result.exit_code == 2 and "model.tiny is false" in result.output
    assert not (tmp_path / "out").exists()
