"""Recipes: YAML read with a safe loader, `--set` overrides, validated before any work starts.

Shape (the `process:` list has the shape of Data-Juicer recipes)::

    input: videos/            # folder, glob, list file (.txt) of paths/URIs, or a list of these
    output: out/brickfilm
    executor: {mode: ray}     # see ExecutorConfig
    plugins: [my_ops.py]      # extra operator modules or files to import
    process:
      - shot_split: {detector: content}
      - clip_length: {min_frames: 15, max_frames: 200}

Every error is a `RecipeError` whose one-line message names the recipe and the item.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bricks.common.settings import (SettingsError, apply_override, first_error, parse_overrides,
                                     read_yaml_mapping)

from . import registry
from .operator import Operator


class RecipeError(SettingsError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExecutorConfig(_Strict):
    mode: Literal["ray", "local"] = "ray"
    """`ray` runs on Ray Data (embedded, or the cluster at `address`); `local` runs in-process,
    two sources at a time."""
    address: str | None = None
    """Ray cluster address (e.g. `auto` or `ray://head:10001`); None starts Ray on this machine."""
    num_cpus: int | None = Field(default=None, ge=1)
    """CPUs for an embedded Ray; None uses all."""
    cpus_per_source: float | None = Field(default=None, gt=0)
    """CPUs reserved by each source's decode-and-process task; None takes the largest
    `resources.cpus` that the recipe's operators declare."""
    decode_threads: int = Field(default=0, ge=0)
    """FFmpeg decoder threads per source (0 = FFmpeg's choice)."""
    frame_buffer_mb: int = Field(default=1024, ge=16)
    """Memory for the frames of one source's open shot; longer shots are decoded again instead.
    Each source in flight (one per Ray worker, two in-process) has a budget of its own."""
    segment_seconds: float | None = Field(default=120.0, gt=0)
    """Sources at least twice this long are cut-detected in key-frame segments of about this
    length in parallel (Ray tasks, or threads in-process); their shots' frames are then decoded
    again by range. The cuts equal the single pass's. None: always one decode pass."""
    rows_per_shard: int = Field(default=1000, ge=1)
    shard_mb: int = Field(default=256, ge=1)
    """A shard closes at whichever of the two limits comes first (at a source boundary)."""


class LimitsConfig(_Strict):
    max_pixels: int = Field(default=4096 * 4096, ge=1)
    """Sources with more pixels per frame are rejected before decoding."""
    max_duration: float = Field(default=6 * 3600.0, gt=0)
    """Sources longer than this (seconds) are rejected before decoding."""


class RecipeModel(_Strict):
    name: str | None = None
    input: str | list[str]
    output: str
    plugins: list[str] = []
    executor: ExecutorConfig = ExecutorConfig()
    limits: LimitsConfig = LimitsConfig()
    process: list[dict[str, dict[str, Any] | None]] = Field(min_length=1)


class Recipe:
    """A validated recipe: settings plus instantiated operators, in order."""

    def __init__(self, model: RecipeModel, ops: list[Operator], source: str) -> None:
        self.model = model
        self.ops = ops
        self.source = source

    @property
    def executor(self) -> ExecutorConfig:
        return self.model.executor

    def to_dict(self) -> dict[str, Any]:
        data = self.model.model_dump(mode="json")
        data["process"] = [{op.name: op.params.model_dump(mode="json")} for op in self.ops]
        return data


def load(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """The recipe at `path` with `--set` overrides applied. Relative `input` and `output`
    paths in the file are relative to the recipe's folder; in overrides, to the current one."""
    path = Path(path)
    try:
        data = read_yaml_mapping(path, "recipe", "a recipe is a mapping with input, output and process")
        data = resolve_paths(data, path.parent)
        parsed = parse_overrides(list(overrides))
        for keys, value in parsed:
            apply_override(data, keys, value, str(path))
    except SettingsError as exc:
        raise RecipeError(str(exc)) from None
    data = resolve_paths(data, Path.cwd(), {keys[0] for keys, _ in parsed})
    return from_dict(data, where=str(path), base_dir=path.parent)


PATH_FIELDS = ("input", "output")


def resolve_paths(data: dict, base_dir: Path, fields=PATH_FIELDS) -> dict:
    """`data` with the relative local paths of `input` and `output` made absolute against
    `base_dir` (normalised, `~` expanded); URIs are left as they are."""
    def absolute(value):
        if not isinstance(value, str) or not value or "://" in value:
            return value
        return os.path.abspath(os.path.join(base_dir, os.path.expanduser(value)))

    resolved = dict(data)
    for key in set(fields) & set(PATH_FIELDS) & set(data):
        value = data[key]
        resolved[key] = [absolute(v) for v in value] if isinstance(value, list) else absolute(value)
    return resolved


def from_dict(data: dict, where: str = "<recipe>", base_dir: Path | None = None) -> Recipe:
    """A recipe from a mapping; relative paths are relative to `base_dir` (default: the
    current folder)."""
    data = resolve_paths(data, base_dir or Path.cwd())
    try:
        model = RecipeModel.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{where}: {first_error(exc, RecipeModel)}") from None
    for plugin in model.plugins:
        try:
            registry.load_plugin(plugin, base_dir)
        except registry.RegistryError as exc:
            raise RecipeError(f"{where}: plugins: {exc}") from None
    ops = [_build_op(item, i, where) for i, item in enumerate(model.process)]
    return Recipe(model, ops, where)


def _build_op(item: dict[str, Any], index: int, where: str) -> Operator:
    if len(item) != 1:
        raise RecipeError(f"{where}: process[{index}]: each item is one `op_name: {{params}}` mapping")
    name, params = next(iter(item.items()))
    at = f"{where}: process[{index}] {name}"
    try:
        cls = registry.get(name)
    except registry.RegistryError as exc:
        raise RecipeError(f"{where}: process[{index}]: {exc}") from None
    try:
        return cls(cls.Params.model_validate(params or {}))
    except ValidationError as exc:
        raise RecipeError(f"{at}: {first_error(exc, cls.Params)}") from None


