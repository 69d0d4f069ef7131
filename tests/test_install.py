"""The package as a user installs it: a wheel built from this tree, installed (not editable) with
the engine's dependencies alone, no torch, in a fresh virtual environment, driven through its
console scripts. Needs the package index (the dependencies are downloaded, as on a new machine)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from bricks.engine.extras import missing_extra
from conftest import read_shards
from test_openai_backend import FakeServer

ROOT = Path(__file__).parents[1]
# Source folder -> where its files go in the wheel (pyproject.toml's package-dir).
PACKAGES = {"engine": "bricks/engine", "operators": "bricks/operators", "model": "bricks/model",
            "train": "bricks/train", "recipes": "bricks/recipes"}
SHIPPED = ("*.py", "*.json", "*.yaml")
NOT_SOURCES = (".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "demo", "bench-out")
VERSION = version("bricks")
MODELS_EXTRA = "needs the 'models' extra: pip install 'bricks[models]'"


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> tuple[Path, str]:
    """The wheel and the build's log."""
    # Built from a copy: an in-tree build/ left by an earlier build would slip stale files into it.
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(work / "dist"), str(src)],
                          capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    (built,) = (work / "dist").glob("bricks-*.whl")
    return built, log


@pytest.fixture(scope="module")
def wheel(build) -> Path:
    return build[0]


@pytest.fixture(scope="module")
def engine_env(tmp_path_factory, wheel):
    """A fresh environment holding the wheel and the engine's dependencies; its bin folder."""
    venv = tmp_path_factory.mktemp("venv") / "engine"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", str(wheel)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    probe = subprocess.run([str(python), "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "None", "the engine-only environment has torch"
    yield venv / "bin"
    shutil.rmtree(venv)  # most of a gigabyte: not kept with pytest's last few temporary folders


def _cli(bin_dir: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], capture_output=True, text=True, cwd=cwd)


def _one_line_error(proc: subprocess.CompletedProcess, prog: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), proc.stderr
    return lines[0]


def test_wheel_builds_without_setuptools_warnings(build):
    # e.g. the license table's deprecation, or a package folder missing from the configuration
    log = build[1]
    assert "BuildBackendWarning" not in log and "SetuptoolsDeprecationWarning" not in log, log


def test_wheel_ships_every_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"{target}/{path.relative_to(ROOT / folder).as_posix()}"
                for folder, target in PACKAGES.items() for pattern in SHIPPED
                for path in (ROOT / folder).rglob(pattern) if "__pycache__" not in path.parts}
    assert "bricks/operators/vlm_backends/base.py" in expected
    assert expected - names == set()
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert any("opencv-python-headless" in line for line in requires)
    assert not any(line.split()[1].startswith(("opencv-python<", "opencv-python>", "scenedetect<", "scenedetect>"))
                   for line in requires)


def test_engine_only_install_lists_operators_and_versions(engine_env):
    ops = _cli(engine_env, "bricks-dj", "ops", "--json")
    assert ops.returncode == 0, ops.stderr
    assert {"shot_split", "aesthetic_filter", "vlm_caption"} <= set(yaml.safe_load(ops.stdout))
    version = _cli(engine_env, "bricks-dj", "--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"bricks-dj {VERSION}"), version.stderr


def test_engine_only_install_names_the_models_extra(engine_env, tmp_path):
    for prog in ("bricks-train", "bricks-sample"):
        line = _one_line_error(_cli(engine_env, prog, "--help"), prog)
        assert MODELS_EXTRA in line and "torch" in line
    line = _one_line_error(_cli(engine_env, "bricks-dj", "demo", "--workdir", str(tmp_path / "demo")), "bricks-dj")
    assert MODELS_EXTRA in line and "aesthetic_filter" in line
    assert not (tmp_path / "demo").exists()  # stopped before generating the corpus


def test_engine_only_install_validates_and_runs_model_free_recipes(engine_env, tmp_path, corpus):
    def recipe(name, *model_steps):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"input": str(corpus[0]), "output": str(tmp_path / name),
                                        "process": [{"shot_split": {}}, {"clip_length": {}}, *model_steps]}))
        return str(path)

    aesthetic = recipe("aesthetic", {"aesthetic_filter": {"preset": "tiny", "device": "cpu"}})
    line = _one_line_error(_cli(engine_env, "bricks-dj", "validate", aesthetic), "bricks-dj")
    assert f"process[2] aesthetic_filter: {MODELS_EXTRA} (torch, open_clip are not installed)" in line
    line = _one_line_error(_cli(engine_env, "bricks-dj", "run", "--local", aesthetic), "bricks-dj")
    assert MODELS_EXTRA in line and not (tmp_path / "aesthetic").exists()

    # An endpoint needs no torch: validate's preflight reaches the (local) endpoint and passes.
    endpoint = FakeServer()
    endpoint.thread.start()
    try:
        openai = recipe("openai", {"vlm_caption": {"backend": "openai", "base_url": endpoint.url}})
        proc = _cli(engine_env, "bricks-dj", "validate", openai)
        assert proc.returncode == 0, proc.stderr
        assert any(hit["path"] == "/v1/models" for hit in endpoint.hits)
    finally:
        endpoint.httpd.shutdown()
        endpoint.httpd.server_close()

    plain = recipe("plain")
    proc = _cli(engine_env, "bricks-dj", "run", "--local", "--strict", plain)
    assert proc.returncode == 0, proc.stderr
    shards = read_shards(tmp_path / "plain")
    assert shards is not None and shards.num_rows > 0


def test_vllm_backend_without_vllm_names_its_extra(tmp_path, corpus):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    assert missing_extra(["torch"]) is None
    path = tmp_path / "vllm.yaml"
    path.write_text(yaml.safe_dump({"input": str(corpus[0]), "output": str(tmp_path / "out"),
                                    "process": [{"shot_split": {}}, {"vlm_caption": {"backend": "vllm"}}]}))
    proc = subprocess.run([sys.executable, "-m", "bricks.engine.cli", "validate", str(path)],
                          capture_output=True, text=True)
    assert _one_line_error(proc, "bricks-dj").endswith(
        "process[1] vlm_caption: needs the 'vllm' extra: pip install 'bricks[vllm]' (vllm is not installed)")


@pytest.mark.parametrize("cli, prog", [("bricks.engine.cli", "bricks-dj"), ("bricks.train.cli", "bricks-train"),
                                       ("bricks.model.cli", "bricks-sample")])
def test_version_on_every_cli(cli, prog):
    from click.testing import CliRunner

    result = CliRunner().invoke(importlib.import_module(cli).main, ["--version"])
    assert (result.exit_code, result.output) == (0, f"{prog} {VERSION}\n")
