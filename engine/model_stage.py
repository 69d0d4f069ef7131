"""Model operators' stages: CPU pre-processing, then batched inference in a pool of actors.

Both work on the per-source result tables (see `rows`): rows still kept carry the frames
their model operators asked for (`_frames`, served in the decode pass). `preprocess_table`
turns them into model inputs (`_inputs`) in a CPU stage of its own; `ModelActor` loads the
model once and runs `infer_table` on batches. Filters and mappers that follow a model operator
(and need no frames) run on the rows in `row_table`, a CPU stage. Only the rows an operator
works on are converted to Python, and only the columns it writes are rebuilt. Rows are never
added or removed, only marked dropped or failed, so every sample stays accounted for.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pyarrow as pa

from bricks.common.weights import warn_tiny

from . import rows
from .operator import FatalModelError, Filter, ModelOperator
from .plan import Plan, Step
from .schema import BASE_COLUMNS, fit_columns, scores_json

log = logging.getLogger("bricks")


def resolve_device(op: ModelOperator, warn: bool = True) -> str:
    """The device a model operator runs on here; `auto` never silently means CPU. An operator
    whose model runs elsewhere gets "cpu", with no warning: it only sends requests."""
    if not op.loads_model_here:
        return "cpu"
    wanted = op.params.device
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if wanted == "cpu":
        if warn:
            log.warning("%s runs on CPU: expect it to be much slower than on a GPU", op.name)
        return "cpu"
    if not has_cuda:
        raise DeviceError(f"{op.name}: no CUDA GPU here; set `device: cpu` to run it on CPU (slow)")
    return "cuda"


class DeviceError(RuntimeError):
    pass


def preprocess_table(table: pa.Table, step: Step, shard: pa.Schema) -> pa.Table:
    """CPU stage: frames to model inputs. A sample whose inputs cannot be made fails alone."""
    kept = [i for i, is_kept in enumerate(rows.is_kept(table).to_pylist()) if is_kept]
    cells = table.column("_frames").take(pa.array(kept, pa.int64())).to_pylist()  # the kept rows' frames only
    served = {i: rows.decode_frames(cell, step.label) for i, cell in zip(kept, cells)}
    todo = [i for i in kept if served[i] is not None]
    inputs, marks = {}, {}
    for i, sample in zip(todo, rows.samples(table, todo, shard)):
        try:
            inputs[i] = rows.pickled(step.op.preprocess(sample, served[i]))
        except Exception as exc:
            marks[i] = (rows.FAILED, step.label, f"pre-processing: {type(exc).__name__}: {exc}", None)
    table = rows.set_values(table, "_inputs", list(inputs), list(inputs.values()))
    return rows.mark(table, marks)


def infer_table(table: pa.Table, step: Step, shard: pa.Schema, last: bool) -> pa.Table:
    """Actor stage: batched inference; a failing batch is retried one sample at a time."""
    op: ModelOperator = step.op
    inputs_column = table.column("_inputs").to_pylist()
    kept = rows.is_kept(table).to_pylist()
    todo = [i for i, data in enumerate(inputs_column) if kept[i] and data is not None]
    seconds = table.column("_model_seconds").to_pylist()
    marks: dict[int, tuple] = {}
    updates: dict[str, dict[int, Any]] = {}
    samples = dict(zip(todo, rows.samples(table, todo, shard)))
    for start in range(0, len(todo), op.params.batch_size):
        batch = todo[start:start + op.params.batch_size]
        began = time.perf_counter()
        outputs = _infer(op, [rows.unpickled(inputs_column[i]) for i in batch])
        share = (time.perf_counter() - began) / len(batch)
        for i, output in zip(batch, outputs):
            spent = json.loads(seconds[i] or "{}")
            spent[step.label] = spent.get(step.label, 0.0) + share
            seconds[i] = json.dumps(spent)
            if isinstance(output, Exception):
                marks[i] = (rows.FAILED, step.label, f"{type(output).__name__}: {output}", None)
                continue
            try:
                # Checked before the row takes them: a value its column cannot hold fails this
                # sample, not the Arrow conversion of the batch.
                fields = fit_columns(op.apply(samples[i], output), {**BASE_COLUMNS, **op.outputs}, op.name)
                reason = rows.verdict(op, fields)
            except Exception as exc:
                marks[i] = (rows.FAILED, step.label, f"{type(exc).__name__}: {exc}", None)
                continue
            for name, value in fields.items():
                updates.setdefault(name, {})[i] = value
            if reason is not None:
                marks[i] = (rows.DROPPED, step.label, reason, scores_json(fields))
    for name, values in updates.items():
        table = rows.set_values(table, name, list(values), list(values.values()))
    table = rows.set_values(table, "_model_seconds", todo, [seconds[i] for i in todo])
    table = rows.clear(rows.mark(table, marks), "_inputs")
    return rows.clear(table, "_frames") if last else table


def row_table(table: pa.Table, step: Step, shard: pa.Schema) -> pa.Table:
    """CPU stage for a filter or mapper after the model operators: on each kept row's fields."""
    from .pipeline import changed_fields, describe_error, returned_dict
    from .samples import Drop

    op = step.op
    op.setup()  # cheap and idempotent, as for the per-source operators
    kept = [i for i, is_kept in enumerate(rows.is_kept(table).to_pylist()) if is_kept]
    seconds = table.column("_model_seconds").to_pylist()
    columns = {**BASE_COLUMNS, **op.outputs}
    marks: dict[int, tuple] = {}
    updates: dict[str, dict[int, Any]] = {}
    worked = []
    for i, sample in zip(kept, rows.samples(table, kept, shard)):
        if not op.applies_to(sample):
            continue
        worked.append(i)
        began = time.perf_counter()
        fields: dict[str, Any] = {}
        try:
            if isinstance(op, Filter):
                fields = fit_columns(returned_dict(op.score(sample, []), f"{op.name}.score"), columns, op.name)
                reason = rows.verdict(op, fields)
            else:
                before = dict(sample)
                after = returned_dict(op.process(sample, []), f"{op.name}.process")
                fields, reason = fit_columns(changed_fields(before, after), columns, op.name), None
        except Drop as drop:
            marks[i] = (rows.DROPPED, step.label, str(drop), scores_json(fields))
        except Exception as exc:  # one bad sample fails alone
            marks[i] = (rows.FAILED, step.label, describe_error(exc), scores_json(fields))
        else:
            for name, value in fields.items():
                updates.setdefault(name, {})[i] = value
            if reason is not None:
                marks[i] = (rows.DROPPED, step.label, reason, scores_json(fields))
        spent = json.loads(seconds[i] or "{}")
        spent[step.label] = spent.get(step.label, 0.0) + time.perf_counter() - began
        seconds[i] = json.dumps(spent)
    for name, values in updates.items():
        table = rows.set_values(table, name, list(values), list(values.values()))
    table = rows.set_values(table, "_model_seconds", worked, [seconds[i] for i in worked])
    return rows.mark(table, marks)


def _infer(op: ModelOperator, inputs: list[Any]) -> list[Any]:
    """The model's outputs for `inputs`; where the batch fails, each sample is tried alone and
    one that still fails gets its exception as its output."""
    try:
        return op.infer(inputs)
    except FatalModelError:
        raise
    except Exception:
        outputs = []
        for one in inputs:
            try:
                outputs.append(op.infer([one])[0])
            except FatalModelError:
                raise
            except Exception as exc:
                outputs.append(exc)
        return outputs


class ModelActor:
    """One per pool slot: loads its model once, then serves batches (Ray calls `__call__`)."""

    loads = 0  # per process: how many times a model was loaded here (tests check reuse)

    def __init__(self, plan: Plan, index: int) -> None:
        self.plan = plan
        self.step = plan.model_steps[index]
        self.last = index == len(plan.model_steps) - 1
        load_model(self.step.op)

    def __call__(self, table: pa.Table) -> pa.Table:
        return infer_table(table, self.step, self.plan.schema, self.last)


def load_model(op: ModelOperator) -> None:
    if op.model is None:
        device = resolve_device(op)
        op.load(device)
        if op.tiny_preset:
            warn_tiny(op.name)
        ModelActor.loads += 1
