"""The README's custom-operator example, run as a user would: its file, its recipe, the CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import read_rejects, read_shards

README = Path(__file__).parents[1] / "README.md"


def example_blocks() -> tuple[str, str]:
    text = README.read_text()
    section = text[text.index("<!-- example: custom-operator"):text.index("<!-- end example -->")]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    (recipe,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    return code, recipe


def test_custom_operator_example(tmp_path, corpus):
    code, recipe = example_blocks()
    (tmp_path / "my_ops.py").write_text(code)
    data = yaml.safe_load(recipe)
    assert data["plugins"] == ["my_ops.py"]
    data.update(input=str(corpus[0]), output=str(tmp_path / "out"))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, "-m", "bricks.engine.cli", "run", str(tmp_path / "recipe.yaml"), "--local"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    kept = read_shards(tmp_path / "out").to_pylist()
    dropped = [r for r in read_rejects(tmp_path / "out").to_pylist() if r["op"] == "1:brightness_filter"]
    # The synthetic shots alternate light and dark backgrounds: both outcomes occur.
    assert kept and dropped
    assert all(r["brightness"] >= 60 for r in kept)
    assert all(r["reason"].startswith("brightness ") for r in dropped)
