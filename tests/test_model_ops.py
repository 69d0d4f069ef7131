"""Model operators: the actor-pool stages, weights resolution, and aesthetic_filter's tiny preset."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("torch")  # the `models` extra; `make test` installs it

from bricks.common import weights as models
from bricks.engine.model_stage import DeviceError
from bricks.engine.recipe import RecipeError, from_dict
from bricks.engine.run import run

from conftest import read_manifest, read_rejects, read_shards, write_recipe

TINY = {"preset": "tiny", "device": "cpu", "batch_size": 4}

COUNTING_PLUGIN = '''
import os
from bricks.engine.operator import FrameRequest, ModelOperator, ModelParams
from bricks.engine.registry import register

class CountParams(ModelParams):
    log: str

@register
class CountLoads(ModelOperator):
    name = "count_loads"
    description = "Records each model load; fails on clips starting at frame 0."
    Params = CountParams

    def frame_requests(self):
        return (FrameRequest("fractions", fractions=(0.5,), short_side=16, pixel_format="gray"),)

    def load(self, device):
        with open(self.params.log, "a") as f:
            f.write(f"{os.getpid()}\\n")
        self.model = "loaded"

    def preprocess(self, sample, frames):
        return (sample["start_frame"], float(frames[0].arrays[0].mean()))

    def infer(self, inputs):
        if any(start == 0 for start, _ in inputs):
            raise ValueError("cannot score a first shot")
        return [brightness for _, brightness in inputs]

    def apply(self, sample, output):
        return {"text": f"brightness {output:.1f}"}
'''


def aesthetic_recipe(corpus, out, mode="local", caption=False, **params):
    process = [{"shot_split": {}}, {"clip_length": {}}, {"middle_frame": {}}, {"aesthetic_filter": {**TINY, **params}}]
    if caption:
        process.append({"vlm_caption": {"preset": "tiny", "backend": "transformers", "device": "cpu",
                                        "batch_size": 8, "max_new_tokens": 6}})
    return from_dict({"input": str(corpus[0]), "output": str(out), "executor": {"mode": mode, "num_cpus": 2},
                      "process": process})


def test_aesthetic_filter_scores_every_sample_and_filters(tmp_path, corpus):
    first = run(aesthetic_recipe(corpus, tmp_path / "all", min_score=0.0))
    scores = read_shards(tmp_path / "all").column("aes").to_pylist()
    assert len(scores) == first["samples"]["total"] and all(isinstance(s, float) for s in scores)
    threshold = sorted(scores)[len(scores) // 2]
    manifest = run(aesthetic_recipe(corpus, tmp_path / "half", min_score=threshold))
    kept = read_shards(tmp_path / "half")
    assert all(s >= threshold for s in kept.column("aes").to_pylist())
    dropped = [r for r in read_rejects(tmp_path / "half").to_pylist() if r["op"] == "3:aesthetic_filter"]
    assert dropped and all(r["reason"].startswith("aes ") and '"aes"' in r["scores"] for r in dropped)
    op = manifest["ops"][3]
    assert op["in"] == first["samples"]["total"] == op["out"] + op["dropped"]
    assert manifest["accounted"]


def test_model_stages_on_ray_match_in_process(tmp_path, corpus):
    # Two actor pools on two CPUs: they must leave room for the decoding tasks.
    run(aesthetic_recipe(corpus, tmp_path / "local", caption=True, min_score=0.077))
    run(aesthetic_recipe(corpus, tmp_path / "ray", mode="ray", caption=True, min_score=0.077, pool_size=1))
    assert read_shards(tmp_path / "ray").equals(read_shards(tmp_path / "local"))
    assert read_manifest(tmp_path / "ray")["ops"][3]["dropped"] == read_manifest(tmp_path / "local")["ops"][3]["dropped"]


@pytest.mark.parametrize("mode", ["local", "ray"])
def test_model_loads_once_per_actor_and_bad_samples_fail_alone(tmp_path, corpus, mode):
    plugin = tmp_path / "count_loads.py"
    plugin.write_text(COUNTING_PLUGIN)
    log = tmp_path / "loads.txt"
    out = tmp_path / "out"
    manifest = run(from_dict({
        "input": str(corpus[0]), "output": str(out), "executor": {"mode": mode, "num_cpus": 2},
        "plugins": [str(plugin)],
        "process": [{"shot_split": {}}, {"count_loads": {"log": str(log), "device": "cpu", "batch_size": 3}}]}))
    assert len(log.read_text().splitlines()) == 1  # one actor, one load, however many batches
    shards = read_shards(out).to_pylist()
    assert shards and all(r["start_frame"] > 0 and r["text"].startswith("brightness ") for r in shards)
    failed = [r for r in read_rejects(out).to_pylist() if r["status"] == "failed"]
    # Only the first shot of each video fails; its batch-mates were retried one by one.
    assert sorted(r["source_uri"] for r in failed) == sorted(str(t.path) for t in corpus[1])
    assert all(r["start_frame"] == 0 and "cannot score a first shot" in r["reason"] for r in failed)
    assert manifest["ops"][1]["failed"] == 3


ROW_OPS_PLUGIN = COUNTING_PLUGIN + '''
import pyarrow as pa
from bricks.engine.operator import Filter, Mapper

@register
class CaptionNumberFilter(Filter):
    name = "caption_number_filter"
    description = "Keeps captions whose number is at most 128."
    outputs = {"caption_number": pa.float64()}

    def score(self, sample, frames):
        return {"caption_number": float(sample["text"].split()[1])}

    def keep(self, scores):
        return True if scores["caption_number"] <= 128 else f"caption_number {scores['caption_number']} > 128"

@register
class ShoutCaption(Mapper):
    name = "shout_caption"
    description = "Upper-cases the caption."

    def process(self, sample, frames):
        return dict(sample, text=sample["text"].upper())
'''


@pytest.mark.parametrize("mode", ["local", "ray"])
def test_frame_free_filters_and_mappers_run_after_model_operators(tmp_path, corpus, mode):
    plugin = tmp_path / "row_ops.py"
    plugin.write_text(ROW_OPS_PLUGIN)
    process = [{"shot_split": {}}, {"count_loads": {"log": str(tmp_path / "loads.txt"), "device": "cpu"}},
               {"caption_number_filter": {}}, {"shout_caption": {}}]
    manifest = run(from_dict({"input": str(corpus[0]), "output": str(tmp_path / "out"), "plugins": [str(plugin)],
                              "executor": {"mode": mode, "num_cpus": 2}, "process": process}))
    kept = read_shards(tmp_path / "out").to_pylist()
    dropped = [r for r in read_rejects(tmp_path / "out").to_pylist() if r["op"] == "2:caption_number_filter"]
    assert kept and dropped  # the corpus has shots on both sides of the threshold
    assert all(r["caption_number"] <= 128 and r["text"].startswith("BRIGHTNESS ") for r in kept)
    assert all('"caption_number"' in r["scores"] and "> 128" in r["reason"] for r in dropped)
    filter_op, mapper_op = manifest["ops"][2], manifest["ops"][3]
    assert filter_op["in"] == manifest["ops"][1]["out"] == filter_op["out"] + filter_op["dropped"]
    assert mapper_op["in"] == filter_op["out"] == mapper_op["out"] == len(kept)
    assert manifest["accounted"]


def test_only_frame_free_operators_follow_model_operators(tmp_path, corpus):
    from bricks.engine.plan import build

    with pytest.raises(RecipeError, match=r"process\[2\] motion_filter: must come before the model operators .* "
                                          "only filters and mappers that need no frames run"):
        build(from_dict({"input": str(corpus[0]), "output": str(tmp_path),
                         "process": [{"shot_split": {}}, {"aesthetic_filter": TINY}, {"motion_filter": {}}]}))


def test_missing_weights_fail_before_any_decoding(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(models.MODEL_DIR_ENV, str(tmp_path / "models"))
    recipe = from_dict({"input": str(corpus[0]), "output": str(tmp_path / "out"),
                        "process": [{"shot_split": {}}, {"aesthetic_filter": {"device": "cpu"}}]})
    with pytest.raises(models.MissingModelError) as err:
        run(recipe)
    message = str(err.value)
    assert "vit_large_patch14_clip_224.openai/open_clip_model.safetensors not found" in message
    assert str(tmp_path / "models") in message and "bricks-dj models download" in message
    assert not (tmp_path / "out").exists()


def test_no_gpu_needs_device_cpu(tmp_path, corpus):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    recipe = from_dict({"input": str(corpus[0]), "output": str(tmp_path / "out"),
                        "process": [{"shot_split": {}}, {"aesthetic_filter": {"preset": "tiny"}}]})
    with pytest.raises(DeviceError, match="set `device: cpu`"):
        run(recipe)


def test_weights_are_found_in_the_model_dir_and_listed(tmp_path, monkeypatch):
    monkeypatch.setenv(models.MODEL_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for repo, name in [("timm/vit_large_patch14_clip_224.openai", "open_clip_model.safetensors"),
                       ("camenduru/improved-aesthetic-predictor", "sac+logos+ava1-l14-linearMSE.pth")]:
        (tmp_path / repo).mkdir(parents=True)
        (tmp_path / repo / name).write_bytes(b"x")
    recipe = write_recipe(tmp_path, [{"shot_split": {}}, {"aesthetic_filter": {"device": "cpu"}}], input=tmp_path)
    proc = subprocess.run([sys.executable, "-m", "bricks.engine.cli", "models", str(recipe)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(": found: ") == 2 and str(tmp_path) in proc.stdout


def test_laion_head_has_the_published_keys(tmp_path):
    import torch

    from bricks.operators.aesthetic_filter import AestheticMLP

    state = AestheticMLP().state_dict()
    assert sorted({k.rsplit(".", 1)[0] for k in state}) == [f"layers.{i}" for i in (0, 2, 4, 6, 7)]
    assert state["layers.0.weight"].shape == (1024, 768) and state["layers.7.weight"].shape == (1, 16)
    path = tmp_path / "head.pth"
    torch.save(state, path)
    AestheticMLP().load_state_dict(torch.load(path, weights_only=True))  # strict


def test_model_operators_run_last(tmp_path, corpus):
    with pytest.raises(RecipeError, match=r"process\[2\] middle_frame: must come before the model operators"):
        from bricks.engine.plan import build

        build(from_dict({"input": str(corpus[0]), "output": str(tmp_path),
                         "process": [{"shot_split": {}}, {"aesthetic_filter": TINY}, {"middle_frame": {}}]}))
