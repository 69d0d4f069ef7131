"""`encode_latents`: latents and T5 states stored by bricks-dj train as the trainer's own encodings do."""

from __future__ import annotations

import glob
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")  # the tiny captioner

from click.testing import CliRunner  # noqa: E402

from bricks.engine.recipe import RecipeError, from_dict  # noqa: E402
from bricks.engine.run import run  # noqa: E402
from bricks.train.buckets import Buckets  # noqa: E402
from bricks.train.cli import main as train_cli  # noqa: E402
from bricks.train.config import load_config  # noqa: E402
from bricks.train.decode import BadSample, normalize, read_array, read_sample  # noqa: E402
from bricks.train.latents import LATENT_COLUMNS, to_npy  # noqa: E402
from bricks.train.metrics import read_metrics  # noqa: E402
from bricks.train.trainer import build_models  # noqa: E402

from conftest import read_shards  # noqa: E402

ENCODE = {"encode_latents": {"config": "tiny-cpu", "device": "cpu", "batch_size": 8}}


def close(stored, expected):
    """Stored bf16 values against the trainer's float32 encoding of the sample alone: at most
    one bf16 step (2^-7) of the tensor's largest value apart. bf16 rounding moves a value by
    at most 2^-8 of itself, and the float32 results of VAE batches of other sizes differ by
    about 1e-4 (measured), which can tip a rounding. Another crop differs by about 0.3."""
    return bool((stored - expected).abs().max() <= 2.0 ** -7 * expected.abs().max())


def recipe(corpus_dir, out, mode="local", encode=ENCODE):
    process = [{"shot_split": {"min_scene_len": 15}}, {"clip_length": {"min_frames": 15, "max_frames": 60}},
               {"middle_frame": {}}, {"encode_clips": {}},
               {"vlm_caption": {"backend": "transformers", "preset": "tiny", "device": "cpu", "batch_size": 8,
                                "max_new_tokens": 6}}, encode]
    return from_dict({"input": str(corpus_dir), "output": str(out), "executor": {"mode": mode, "num_cpus": 2},
                      "process": process})


@pytest.fixture(scope="module")
def latent_shards(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("latents") / "out"
    run(recipe(corpus[0], out))
    return out


def without_latents(out, folder):
    """The same shards, row group for row group, without the columns encode_latents wrote."""
    folder.mkdir()
    for path in sorted(glob.glob(str(out / "shards" / "*.parquet"))):
        parquet = pq.ParquetFile(path)
        groups = [parquet.read_row_group(g).drop_columns(list(LATENT_COLUMNS))
                  for g in range(parquet.metadata.num_row_groups)]
        with pq.ParquetWriter(folder / os.path.basename(path), groups[0].schema) as writer:
            for group in groups:
                writer.write_table(group)
    return folder


def train(data, run_dir, *extra, steps=8):
    result = CliRunner().invoke(train_cli, ["--config", "tiny-cpu", "--data", str(data), "--output", str(run_dir),
                                            "--max-steps", str(steps), *extra])
    return result


def test_stored_latents_are_the_trainers_encodings_of_the_centre_crop(latent_shards):
    check_against_the_trainer(read_shards(latent_shards).to_pylist())


def check_against_the_trainer(rows):
    config = load_config("tiny-cpu", for_training=False)
    buckets = Buckets(config.data.bucket_config, config.data.frame_interval)
    models = build_models(config.model, None, torch.device("cpu"), torch.float32, config.train.seed)
    encoded = other_crop_differs = 0
    for row in rows:
        key = buckets.assign(row["num_frames"], row["height"], row["width"], row["kind"] == "image", None, draw=False)
        if key is None:  # a 15- or 16-frame clip: kept, without latents (the trainer leaves it out too)
            assert row["vae_latent"] is None and row["latent_bucket"] is None and row["kind"] == "video"
            continue
        encoded += 1
        T, H, W = buckets.frame_size(key)
        assert row["latent_bucket"] == str(key) and row["vae_latent_shape"] == [4, T, H // 8, W // 8]
        assert (row["latent_dtype"], row["latent_vae"], row["latent_frame_interval"]) == ("bf16", "tiny(seed=42)", 2)
        stored = read_array(row["vae_latent"], "vae_latent", "bf16")
        expected = models.vae.encode(normalize(read_sample(row, T, (H, W), 2, None)[None]), sample=False)[0]
        assert close(stored, expected), row["sample_id"]
        if T > 1:  # another crop of the same clip is told apart by the same bound
            other = models.vae.encode(normalize(read_sample(row, T, (H, W), 2, np.random.default_rng(1))[None]),
                                      sample=False)[0]
            other_crop_differs += not close(stored, other)
        if not (row["text"] or "").strip():  # the tiny captioner can answer nothing: no states then
            assert row["t5_states"] is None and row["latent_text_encoder"] is None
            continue
        states = read_array(row["t5_states"], "t5_states", "bf16")
        text = models.text_encoder.encode([row["text"]])
        tokens = int(text["mask"].sum())
        assert states.shape == (tokens, 32) and row["latent_text_encoder"] == "tiny(seed=42)"
        assert close(states, text["y"][0, 0, :tokens])
    assert encoded >= 30 and encoded < len(rows)
    assert other_crop_differs >= 5


def test_training_on_stored_latents_gives_the_losses_of_encoding_on_the_fly(latent_shards, tmp_path):
    """The same steps on the same rows: stored bf16 latents and T5 states, against encoding the
    same centre crops on the fly with the posterior's mean (which draws no random numbers, so
    every step's noise, timesteps, masks and caption dropout are the same draws).

    Tolerance 1e-5 relative, on the loss and the gradient norm of every step. The bf16 rounding
    of the inputs moves them by about 2e-7 and 1e-6 here; another temporal crop of the same
    clips by about 1e-6 and 1e-4: the tiny random model's loss hardly depends on what the
    latents show (the noise dominates it), its gradient does, so the gradient norm is what
    tells a wrong crop."""
    def steps(run_dir):
        metrics = read_metrics(run_dir / "metrics.jsonl")
        assert len(metrics) == 8 and all(m["samples"] > 0 and m["skipped"] == 0 for m in metrics)
        return [m["loss"] for m in metrics], [m["grad_norm"] for m in metrics]

    stored = tmp_path / "stored"
    assert train(latent_shards, stored).exit_code == 0
    plain = without_latents(latent_shards, tmp_path / "plain")
    on_the_fly = tmp_path / "on-the-fly"
    result = train(plain, on_the_fly, "--set", "data.temporal_crop=center", "--set", "model.vae_posterior=mean")
    assert result.exit_code == 0, result.output
    (loss_a, grad_a), (loss_b, grad_b) = steps(stored), steps(on_the_fly)
    assert loss_a == pytest.approx(loss_b, rel=1e-5) and grad_a == pytest.approx(grad_b, rel=1e-5)

    random_crop = tmp_path / "random-crop"  # the trainer's default crop: the comparison can fail
    assert train(plain, random_crop, "--set", "model.vae_posterior=mean").exit_code == 0
    assert steps(random_crop)[1] != pytest.approx(grad_a, rel=1e-5)


def test_a_config_whose_buckets_or_encoders_differ_is_refused(latent_shards, tmp_path):
    cases = [
        (["--set", "data.frame_interval=3"], "do not match this config"),
        (["--set", "data.bucket_config={144p: {1: [1.0, 4], 6: [1.0, 2]}}"], "for bucket 144p/8f/0.56"),
        (["--set", "train.seed=7"], "latents of the VAE tiny(seed=42), this config's is tiny(seed=7)"),
        (["--set", "model.tiny=false"], "this config's is stabilityai/sd-vae-ft-ema"),  # before any weights load
    ]
    for k, (extra, message) in enumerate(cases):
        result = train(latent_shards, tmp_path / f"run{k}", *extra)
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
        lines = [line for line in result.output.splitlines() if line.startswith("bricks-train: error:")]
        assert len(lines) == 1 and "encode_latents again with this config" in lines[0]
        assert not (tmp_path / f"run{k}" / "metrics.jsonl").exists()


def test_on_ray_the_latents_are_those_of_the_local_run(corpus, latent_shards, tmp_path):
    run(recipe(corpus[0], tmp_path / "ray", mode="ray"))
    local = {r["sample_id"]: r for r in read_shards(latent_shards).to_pylist()}
    on_ray = read_shards(tmp_path / "ray").to_pylist()
    assert sorted(local) == sorted(r["sample_id"] for r in on_ray)
    same_media = 0
    for row in on_ray:
        mine = local[row["sample_id"]]
        assert (row["latent_bucket"], row["vae_latent_shape"]) == (mine["latent_bucket"], mine["vae_latent_shape"])
        # encode_clips' MP4s are not always the same bytes in two runs; the same bytes encode alike,
        # to bf16 rounding (an actor's batches and CPU threads differ from the local run's, and so
        # do the last float bits before rounding)
        if row["media"] == mine["media"]:
            same_media += 1
            for column in ("vae_latent", "t5_states"):
                assert (row[column] is None) == (mine[column] is None)
                if row[column] is not None:
                    assert close(read_array(row[column], column, "bf16"), read_array(mine[column], column, "bf16"))
    assert same_media >= len(on_ray) // 2
    check_against_the_trainer(on_ray)


def test_arrays_round_trip_exactly_in_both_dtypes():
    values = np.random.default_rng(0).standard_normal((4, 3, 5, 7)).astype(np.float32) * 3
    bf16 = read_array(to_npy(values, "bf16"), "vae_latent", "bf16")
    assert torch.equal(bf16, torch.from_numpy(values).bfloat16().float())
    assert not torch.equal(bf16, torch.from_numpy(values))  # rounded, not passed through
    fp16 = read_array(to_npy(values, "fp16"), "vae_latent", "fp16")
    assert torch.equal(fp16, torch.from_numpy(values.astype(np.float16).astype(np.float32)))
    with pytest.raises(BadSample, match="expected floats, got uint16"):
        read_array(to_npy(values, "bf16"), "vae_latent", None)  # bf16 bits are never taken for numbers
    with pytest.raises(BadSample, match="latent_dtype is bf16"):
        read_array(to_npy(values, "fp16"), "vae_latent", "bf16")


@pytest.mark.parametrize("params, message", [
    ({"config": "nope"}, "shipped: text2bricks-360p-32f, text2bricks-360p-64f, tiny-cpu"),
    ({}, "give `config`"),
    ({"buckets": {"bucket_config": {"999p": {1: [1.0, 4]}}}}, "unknown resolution '999p'"),
    ({"config": "tiny-cpu", "dtype": "fp32"}, "dtype"),
    ({"config": "tiny-cpu", "bucket": {}}, "bucket"),
])
def test_bad_parameters_are_one_line_errors(tmp_path, params, message):
    with pytest.raises(RecipeError) as error:
        recipe(tmp_path, tmp_path / "out", encode={"encode_latents": params})
    assert message in str(error.value) and "process[5] encode_latents" in str(error.value)
    assert "\n" not in str(error.value)
