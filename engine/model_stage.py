"""Model operators' stages: CPU pre-processing, then batched inference in a pool of actors.

Both work on the per-source result tables (see `runners`): rows still kept carry the frames
their model operators asked for (`_frames`, served in the decode pass). `preprocess_table`
turns them into model inputs (`_inputs`) in a CPU stage of its own; `ModelActor` loads the
model once and runs `infer_table` on batches. Rows are never added or removed, only marked
dropped or failed, so every sample stays accounted for.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
from typing import Any

import pyarrow as pa

from bricks.common.weights import warn_tiny
from .operator import FatalModelError, ModelOperator
from .plan import Plan, Step
from .schema import BASE_COLUMNS, fit_columns, scores_json

log = logging.getLogger("bricks")


def resolve_device(op: ModelOperator, warn: bool = True) -> str:
    """The device a model operator runs on here; `auto` never silently means CPU."""
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


def ray_resources(op: ModelOperator) -> dict[str, float]:
    return {"num_gpus": 0.0 if op.params.device == "cpu" else op.params.num_gpus, "num_cpus": op.params.num_cpus}


def _rows(table: pa.Table) -> list[dict[str, Any]]:
    return table.to_pylist()


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.table({f.name: [row.get(f.name) for row in rows] for f in schema}, schema=schema)


def _sample(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def preprocess_table(table: pa.Table, step: Step, schema: pa.Schema) -> pa.Table:
    """CPU stage: frames to model inputs. A sample whose inputs cannot be made fails alone."""
    rows = _rows(table)
    for row in rows:
        if row["_status"] != "kept" or row.get("_frames") is None:
            continue
        frames = pickle.loads(row["_frames"]).get(step.label)
        if frames is None:
            continue
        try:
            row["_inputs"] = pickle.dumps(step.op.preprocess(_sample(row), frames))
        except Exception as exc:
            _reject(row, step, "failed", f"pre-processing: {type(exc).__name__}: {exc}")
    return _table(rows, schema)


def infer_table(table: pa.Table, step: Step, schema: pa.Schema, last: bool) -> pa.Table:
    """Actor stage: batched inference; a failing batch is retried one sample at a time."""
    op: ModelOperator = step.op
    rows = _rows(table)
    todo = [row for row in rows if row["_status"] == "kept" and row.get("_inputs") is not None]
    for start in range(0, len(todo), op.params.batch_size):
        batch = todo[start:start + op.params.batch_size]
        began = time.perf_counter()
        inputs = [pickle.loads(row["_inputs"]) for row in batch]
        try:
            outputs = op.infer(inputs)
        except FatalModelError:
            raise
        except Exception:
            outputs = []
            for row, one in zip(batch, inputs):
                try:
                    outputs.append(op.infer([one])[0])
                except FatalModelError:
                    raise
                except Exception as exc:
                    outputs.append(exc)
        share = (time.perf_counter() - began) / len(batch)
        for row, output in zip(batch, outputs):
            seconds = json.loads(row.get("_model_seconds") or "{}")
            seconds[step.label] = seconds.get(step.label, 0.0) + share
            row["_model_seconds"] = json.dumps(seconds)
            if isinstance(output, Exception):
                _reject(row, step, "failed", f"{type(output).__name__}: {output}")
                continue
            _decide(row, step, output)
    for row in rows:
        row["_inputs"] = None
        if last:
            row["_frames"] = None
    return _table(rows, schema)


def _decide(row: dict[str, Any], step: Step, output: Any) -> None:
    op: ModelOperator = step.op
    try:
        # Checked before the row takes them: a value its column cannot hold fails this sample,
        # not the Arrow conversion of the batch.
        fields = fit_columns(op.apply(_sample(row), output), {**BASE_COLUMNS, **op.outputs}, op.name)
        row.update(fields)
        decision = op.keep(fields)
    except Exception as exc:
        _reject(row, step, "failed", f"{type(exc).__name__}: {exc}")
        return
    if decision is not True:
        _reject(row, step, "dropped", decision if isinstance(decision, str) else f"rejected by {op.name}",
                scores_json(fields))


def _reject(row: dict[str, Any], step: Step, status: str, reason: str, scores: str | None = None) -> None:
    row.update(_status=status, _op=step.label, _reason=reason, _scores=scores)


class ModelActor:
    """One per pool slot: loads its model once, then serves batches (Ray calls `__call__`)."""

    loads = 0  # per process: how many times a model was loaded here (tests check reuse)

    def __init__(self, plan: Plan, index: int) -> None:
        self.plan = plan
        self.step = plan.model_steps[index]
        self.last = index == len(plan.model_steps) - 1
        self.schema = _result_schema(plan)
        load_model(self.step.op)

    def __call__(self, table: pa.Table) -> pa.Table:
        return infer_table(table, self.step, self.schema, self.last)


def load_model(op: ModelOperator) -> None:
    if op.model is None:
        device = resolve_device(op)
        op.load(device)
        if op.tiny_preset:
            warn_tiny(op.name)
        ModelActor.loads += 1


def _result_schema(plan: Plan) -> pa.Schema:
    from .runners import result_schema

    return result_schema(plan)
