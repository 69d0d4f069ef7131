"""From a validated recipe to an execution plan: operator order checked, schema and ids fixed.

A recipe runs in three parts per source: operators before the segmenter work on container
metadata only (no decoding); the segmenter (`shot_split`) sees every frame during the one
decode pass; operators after it run on each shot as soon as it closes, their frames served
from that same pass. Model operators run last, in actor pools (see `model_stage`); filters and
mappers that need no frames may follow them (a caption filter after `vlm_caption`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pyarrow as pa

from .dataset_files import DatasetError, merge_columns
from .operator import FanOut, Filter, Mapper, ModelOperator, Operator, Resources, Segmenter
from .recipe import ExecutorConfig, LimitsConfig, Recipe, RecipeError
from .rows import result_schema
from .schema import SCHEMA_VERSION, shard_schema


@dataclass
class Step:
    index: int  # position in the recipe's process list
    op: Operator

    @property
    def label(self) -> str:
        return f"{self.index}:{self.op.name}"


@dataclass
class Plan:
    steps: list[Step]
    pre: list[Step]
    segmenter: Step | None
    post: list[Step]
    model_steps: list[Step]  # after the per-source operators, in actor pools
    final_steps: list[Step]  # the model steps, and the frame-free filters and mappers among and after them
    schema: pa.Schema
    recipe_key: str
    executor: ExecutorConfig
    limits: LimitsConfig

    @property
    def result_schema(self) -> pa.Schema:
        """The shard columns and the row bookkeeping of `rows`."""
        return result_schema(self.schema)

    @property
    def post_needs_frames(self) -> bool:
        return any(step.op.needs_frames for step in self.post + self.model_steps)

    @property
    def frame_requests(self) -> tuple:
        """Every distinct frame request served in the decode pass (model operators' too)."""
        return tuple(dict.fromkeys(r for step in self.post + self.model_steps for r in step.op.frame_requests()))

    @property
    def keep_short_side(self) -> int | None:
        """Smallest frame size that serves every request (None: full size)."""
        sizes = [r.short_side for r in self.frame_requests]
        if not sizes or any(size is None for size in sizes):
            return None
        return max(sizes)

    @property
    def source_steps(self) -> list[Step]:
        """The steps that run in each source's task (model operators run in actor pools)."""
        return self.pre + ([self.segmenter] if self.segmenter else []) + self.post

    @property
    def source_resources(self) -> Resources:
        """What each source's task reserves: the most any of its operators declares, with
        `executor.cpus_per_source` overriding the CPUs."""
        declared = [step.op.resources for step in self.source_steps]
        cpus = self.executor.cpus_per_source or max((r.cpus for r in declared), default=1.0)
        return Resources(cpus=cpus, gpus=max((r.gpus for r in declared), default=0.0))

    def setup(self) -> None:
        for step in self.steps:
            step.op.setup()


def build(recipe: Recipe, carried: dict[str, pa.DataType] | None = None) -> Plan:
    """`carried`: the columns that data-set files in `input` give their videos (see
    `dataset_files`); they come after the base columns, in the operators' type where an
    operator writes one too."""
    steps = [Step(i, op) for i, op in enumerate(recipe.ops)]
    seg_positions = [s.index for s in steps if isinstance(s.op, Segmenter)]
    if len(seg_positions) > 1:
        raise RecipeError(
            f"{recipe.source}: process[{seg_positions[1]}] {steps[seg_positions[1]].op.name}: "
            "only one segmenter per recipe"
        )
    segmenter = steps[seg_positions[0]] if seg_positions else None
    cut = segmenter.index if segmenter else 0
    pre, post = steps[:cut], steps[cut + 1 if segmenter else 0:]
    first_model = next((i for i, s in enumerate(post) if isinstance(s.op, ModelOperator)), len(post))
    post, final_steps = post[:first_model], post[first_model:]
    for step in final_steps:
        # After a model operator, only operators that work on a sample's fields can run (a
        # caption filter after vlm_caption): the decode pass is over by then.
        if not isinstance(step.op, ModelOperator) and (step.op.needs_frames or not isinstance(step.op, (Filter, Mapper))):
            raise RecipeError(
                f"{recipe.source}: process[{step.index}] {step.op.name}: must come before the model operators "
                f"({final_steps[0].op.name}...), which run last, in actor pools; after them only filters and "
                "mappers that need no frames run"
            )
    model_steps = [step for step in final_steps if isinstance(step.op, ModelOperator)]
    for step in pre:
        if isinstance(step.op, ModelOperator):
            raise RecipeError(f"{recipe.source}: process[{step.index}] {step.op.name}: must come after {segmenter.op.name}")
    for step in pre:
        if step.op.needs_frames or isinstance(step.op, FanOut):
            raise RecipeError(
                f"{recipe.source}: process[{step.index}] {step.op.name}: must come after "
                f"{segmenter.op.name} (before it only metadata filters and mappers run)"
            )
    outputs: dict[str, pa.DataType] = {}
    for step in steps:
        for name, dtype in step.op.outputs.items():
            if outputs.get(name, dtype) != dtype:
                raise RecipeError(f"{recipe.source}: process[{step.index}] {step.op.name}: "
                                  f"column '{name}' already has type {outputs[name]}")
            outputs[name] = dtype
    try:
        schema = shard_schema({**merge_columns(carried or {}, outputs), **outputs})
    except (ValueError, DatasetError) as exc:
        raise RecipeError(f"{recipe.source}: {exc}") from None
    process = [{s.op.name: s.op.params.model_dump(mode="json")} for s in steps]
    key = json.dumps({"schema": SCHEMA_VERSION, "process": process}, sort_keys=True)
    return Plan(
        steps=steps, pre=pre, segmenter=segmenter, post=post, model_steps=model_steps, final_steps=final_steps,
        schema=schema,
        recipe_key=hashlib.sha1(key.encode()).hexdigest()[:16],
        executor=recipe.executor, limits=recipe.model.limits,
    )

