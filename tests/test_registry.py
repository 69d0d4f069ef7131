"""The registry, the entry-point group and recipe plug-ins."""

from __future__ import annotations

import sys
import textwrap

import pytest

from bricks.engine import registry
from bricks.engine.operator import Filter, Mapper
from bricks.engine.recipe import RecipeError, load

from conftest import read_shards, write_recipe


def test_builtins_are_registered_with_kind_and_description():
    ops = registry.all_operators()
    assert {"shot_split", "clip_length", "motion_filter", "middle_frame", "resolution_filter",
            "duration_filter", "fps_filter", "encode_clips"} <= set(ops)
    assert registry.kind_of(ops["middle_frame"]) == "fan-out"
    assert registry.kind_of(ops["motion_filter"]) == "filter"


def test_register_rejects_bad_operators():
    class NoName(Mapper):
        description = "x"

    with pytest.raises(registry.RegistryError, match="needs a non-empty `name`"):
        registry.register(NoName)

    class Clash(Filter):
        name = "shot_split"
        description = "another one"

    with pytest.raises(registry.RegistryError, match="'shot_split' is taken"):
        registry.register(Clash)
    with pytest.raises(registry.RegistryError, match="must subclass"):
        registry.register(int)


def test_unknown_operator_suggests_the_nearest():
    with pytest.raises(registry.RegistryError, match="did you mean 'middle_frame'"):
        registry.get("midle_frame")


PLUGIN = textwrap.dedent('''
    from bricks.engine.operator import Mapper, OperatorParams
    from bricks.engine.registry import register

    class TagParams(OperatorParams):
        tag: str = "brick"

    @register
    class Tag(Mapper):
        name = "{name}"
        description = "Write a fixed caption."
        Params = TagParams

        def process(self, sample, frames):
            sample["text"] = self.params.tag
            return sample
''')


def test_recipe_plugin_file(tmp_path, corpus):
    (tmp_path / "tag_op.py").write_text(PLUGIN.format(name="tag_from_file"))
    path = write_recipe(tmp_path, [{"shot_split": {}}, {"tag_from_file": {"tag": "hello"}}],
                        input=corpus[1][0].path, plugins=["tag_op.py"])
    from bricks.engine.run import run

    run(load(path))
    assert set(read_shards(tmp_path / "out").column("text").to_pylist()) == {"hello"}
    bad = write_recipe(tmp_path, [{"shot_split": {}}], input=corpus[0], plugins=["missing.py"])
    with pytest.raises(RecipeError, match="plugins: plug-in file not found"):
        load(bad)


def test_entry_point_plugin(tmp_path, monkeypatch):
    """A third-party package registers through the `bricks.operators` entry-point group."""
    package = tmp_path / "brickplug"
    package.mkdir()
    (package / "__init__.py").write_text(PLUGIN.format(name="tag_from_entry_point"))
    dist = tmp_path / "brickplug-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: brickplug\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[bricks.operators]\ntag = brickplug\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_discovered", False)
    try:
        assert "tag_from_entry_point" in registry.all_operators()
    finally:
        sys.modules.pop("brickplug", None)
        registry._OPERATORS.pop("tag_from_entry_point", None)
