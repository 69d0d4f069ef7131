"""Mistakes on the command lines: one line naming what is wrong and where, exit status 2, no
traceback, nothing written. The real entry points run in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bricks.train.config import resolve_config_path

from conftest import write_recipe

DJ = [sys.executable, "-m", "bricks.engine.cli"]
TRAIN = [sys.executable, "-m", "bricks.train.cli"]


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(cmd, capture_output=True, text=True, env={**full_env, **env}, timeout=120)


def one_line_error(proc: subprocess.CompletedProcess, prog: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{prog}: error: ")
    return lines[0]


@pytest.fixture
def recipe(tmp_path, corpus) -> Path:
    return write_recipe(tmp_path, [{"shot_split": {}}, {"motion_filter": {"min_score": 0.1}}], input=corpus[0])


@pytest.mark.parametrize("command", ["validate", "run"])
def test_invalid_yaml_in_a_set_value_names_the_override(recipe, command):
    override = "process.motion_filter.min_score=[1"
    line = one_line_error(run(DJ + [command, str(recipe), "--set", override]), "bricks-dj")
    assert f"--set '{override}': the value is not valid YAML" in line
    assert "quote it" in line
    assert not (recipe.parent / "out").exists()


def test_invalid_yaml_in_a_set_value_of_bricks_train(tmp_path):
    line = one_line_error(run(TRAIN + ["--config", "tiny-cpu", "--data", str(tmp_path), "--output",
                                       str(tmp_path / "run"), "--set", "optim.lr=[1"]), "bricks-train")
    assert "--set 'optim.lr=[1': the value is not valid YAML" in line
    assert not (tmp_path / "run").exists()


def test_a_recipe_that_is_not_utf8_names_the_file_and_byte(tmp_path, corpus):
    text = yaml.safe_dump({"input": str(corpus[0]), "output": str(tmp_path / "out"),
                           "process": [{"shot_split": {}}]}, sort_keys=False)
    data = text.encode() + "# tourné à Paris\n".encode("latin-1")
    path = tmp_path / "latin1.yaml"
    path.write_bytes(data)
    byte, line_number = data.index(b"\xe9"), text.count("\n") + 1
    line = one_line_error(run(DJ + ["validate", str(path)]), "bricks-dj")
    assert f"{path}: not UTF-8 text: byte {byte} (line {line_number}) is 0xe9" in line


def test_a_training_config_that_is_not_utf8_names_the_file_and_byte(tmp_path):
    data = "# réglages\n".encode("latin-1") + resolve_config_path("tiny-cpu").read_bytes()
    path = tmp_path / "latin1.yaml"
    path.write_bytes(data)
    line = one_line_error(run(TRAIN + ["--config", str(path), "--data", str(tmp_path), "--output",
                                       str(tmp_path / "run")]), "bricks-train")
    assert f"{path}: not UTF-8 text: byte 3 (line 1) is 0xe9" in line


def _ray_running_here() -> bool:
    """A Ray GCS server on this machine (e.g. another test session's) would answer `auto`."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "gcs_server":
                return True
        except OSError:
            continue
    return False


@pytest.mark.parametrize("address", ["127.0.0.1:1", "auto"])
def test_no_ray_cluster_at_the_address(recipe, address):
    if address == "auto" and _ray_running_here():
        pytest.skip("a Ray cluster runs on this machine, so `auto` finds one")
    line = one_line_error(run(DJ + ["run", str(recipe), "--address", address]), "bricks-dj")
    assert f"no Ray cluster found at {address} " in line
    assert "ray start --head" in line and "--local" in line
    assert not (recipe.parent / "out").exists()


def test_an_address_that_is_not_host_and_port(recipe):
    line = one_line_error(run(DJ + ["run", str(recipe), "--address", "localhost"]), "bricks-dj")
    assert "expected HOST:PORT" in line


def model_recipe(tmp_path, corpus, **params) -> Path:
    return write_recipe(tmp_path, [{"shot_split": {}}, {"aesthetic_filter": params}], input=corpus[0])


def no_weights_env(tmp_path) -> dict[str, str]:
    return {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "BRICKS_MODEL_DIR": str(tmp_path / "models")}


def test_validate_checks_weights_as_run_does(tmp_path, corpus):
    recipe = model_recipe(tmp_path, corpus, device="cpu")
    env = no_weights_env(tmp_path)
    for command in ("validate", "run"):
        line = one_line_error(run(DJ + [command, str(recipe)], **env), "bricks-dj")
        assert "model weights timm/vit_large_patch14_clip_224.openai/open_clip_model.safetensors not found" in line
    assert not (tmp_path / "out").exists()


def test_validate_checks_the_device_as_run_does(tmp_path, corpus):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    recipe = model_recipe(tmp_path, corpus, preset="tiny")
    line = one_line_error(run(DJ + ["validate", str(recipe)]), "bricks-dj")
    assert "aesthetic_filter: no CUDA GPU here; set `device: cpu`" in line


def test_validate_checks_the_endpoint_as_run_does(tmp_path, corpus):
    caption = {"backend": "openai", "base_url": "http://127.0.0.1:1/v1",
               "allow_insecure_http": True, "retries": 0}
    recipe = write_recipe(tmp_path, [{"shot_split": {}}, {"vlm_caption": caption}], input=corpus[0])
    line = one_line_error(run(DJ + ["validate", str(recipe)], OPENAI_API_KEY="test-key"), "bricks-dj")
    assert "http://127.0.0.1:1/v1" in line


def test_models_lists_missing_weights_and_exits_1(tmp_path, corpus):
    recipe = model_recipe(tmp_path, corpus, device="cpu")
    proc = run(DJ + ["models", str(recipe)], **no_weights_env(tmp_path))
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.count(": missing: ") == 2 and "Traceback" not in proc.stderr
