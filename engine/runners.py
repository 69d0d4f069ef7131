"""Runners: where `process_source` runs. In-process (debugging, tests) or on Ray Data.

Both yield the same thing, one Arrow table per source: its kept samples and its rejects as
rows, with `_`-prefixed bookkeeping columns (source index, row count, status, reason, stats),
so Ray and in-process runs produce identical shards.
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import pyarrow as pa

from .model_stage import ModelActor, preprocess_table, ray_resources
from .pipeline import SourceResult, process_source
from .live_frames import FrameBoard, Sink, mirrored_from_ray, reporting
from .plan import Plan
from .ray_cluster import init_ray
from .schema import REJECT_COLUMNS

log = logging.getLogger("bricks")

INTERNAL = {
    "_source_index": pa.int64(),
    "_source_rows": pa.int64(),
    "_status": pa.string(),
    "_op": pa.string(),
    "_reason": pa.string(),
    "_scores": pa.string(),
    "_stats": pa.string(),
    "_frames": pa.binary(),  # pickled frames for the model operators still to run
    "_inputs": pa.binary(),  # pickled model inputs, between pre-processing and inference
    "_model_seconds": pa.string(),  # JSON: seconds per model operator spent on this row
}


def result_schema(plan: Plan) -> pa.Schema:
    return pa.schema(list(plan.schema) + [pa.field(n, t) for n, t in INTERNAL.items()])


def result_table(plan: Plan, index: int, result: SourceResult) -> pa.Table:
    rows = []
    for sample in result.kept:
        row = dict(sample, _status="kept")
        if sample.get("_frames"):
            row["_frames"] = pickle.dumps(sample["_frames"])
        rows.append(row)
    for r in result.rejects:
        rows.append({
            "sample_id": r["sample_id"], "kind": r["kind"], "source_uri": r["source_uri"],
            "start_frame": r["start_frame"], "end_frame": r["end_frame"], "_status": r["status"],
            "_op": r["op"], "_reason": r["reason"], "_scores": r["scores"],
        })
    if not rows:  # e.g. every sample went through an operator that keeps nothing
        rows.append({"source_uri": result.uri, "kind": "source", "_status": "dropped",
                     "_op": "pipeline", "_reason": "no samples were produced"})
    for row in rows:
        row["_source_index"] = index
        row["_source_rows"] = len(rows)
    rows[0]["_stats"] = json.dumps(dict(result.stats(), uri=result.uri))
    schema = result_schema(plan)
    return pa.table({f.name: [row.get(f.name) for row in rows] for f in schema}, schema=schema)


def split_result(plan: Plan, table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(kept rows in the shard schema, reject rows in the rejects schema)."""
    status = table.column("_status")
    kept_mask = pa.compute.equal(status, "kept")
    kept = table.filter(kept_mask).select(plan.schema.names).cast(plan.schema)
    rej = table.filter(pa.compute.invert(kept_mask))
    rejects = pa.table({
        "sample_id": rej.column("sample_id"), "kind": rej.column("kind"),
        "source_uri": rej.column("source_uri"), "start_frame": rej.column("start_frame"),
        "end_frame": rej.column("end_frame"), "status": rej.column("_status"),
        "op": rej.column("_op"), "reason": rej.column("_reason"), "scores": rej.column("_scores"),
    }).cast(pa.schema([pa.field(n, t) for n, t in REJECT_COLUMNS.items()]))
    return kept, rejects


def _process(plan: Plan, index: int, uri: str, frames_to: Sink | None = None) -> pa.Table:
    with reporting(frames_to, uri):
        return result_table(plan, index, process_source(plan, uri))


# In-process runs work on this many sources at once: while one source's last shots go
# through the operators (on one thread), the next one is already decoding.
LOCAL_SOURCES_IN_FLIGHT = 2


def run_local(plan: Plan, sources: list[tuple[int, str]], board: FrameBoard | None = None) -> Iterator[pa.Table]:
    # Each source in flight has operators of its own, as each Ray worker has, so that no
    # operator instance ever sees two sources at once.
    plans = [plan] + [copy.deepcopy(plan) for _ in range(LOCAL_SOURCES_IN_FLIGHT - 1)]
    for each in plans:
        each.setup()
    schema = result_schema(plan)
    actors = [ModelActor(plan, k) for k in range(len(plan.model_steps))]
    queued = iter(enumerate(sources))
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(LOCAL_SOURCES_IN_FLIGHT, thread_name_prefix="bricks-source") as pool:

        def submit_next() -> None:
            item = next(queued, None)
            if item is not None:
                # Source k is submitted once source k - IN_FLIGHT is done, so its plan is free.
                k, (index, uri) = item
                pending.append(pool.submit(_process, plans[k % len(plans)], index, uri, board))

        try:
            for _ in plans:
                submit_next()
            while pending:
                table = pending.popleft().result()
                submit_next()
                for step, actor in zip(plan.model_steps, actors):
                    table = actor(preprocess_table(table, step, schema))
                yield table
        finally:
            for future in pending:  # the caller stopped early: do not start what waits
                future.cancel()


def _ray_batch(batch: pa.Table, plan: Plan, frames_to: Sink | None) -> pa.Table:
    # Operators' setup is cheap and idempotent for CPU operators; model operators run in
    # actor pools of their own.
    plan.setup()
    tables = [_process(plan, index, uri, frames_to) for index, uri in
              zip(batch.column("index").to_pylist(), batch.column("uri").to_pylist())]
    return pa.concat_tables(tables)


def run_ray(plan: Plan, sources: list[tuple[int, str]], board: FrameBoard | None = None) -> Iterator[pa.Table]:
    init_ray(plan.executor)  # before `import ray`: some of its settings are read on import
    with mirrored_from_ray(board) as frames_to:
        yield from _ray_results(plan, sources, frames_to)


def _ray_results(plan: Plan, sources: list[tuple[int, str]], frames_to: Sink | None) -> Iterator[pa.Table]:
    import ray
    from ray import cloudpickle

    from . import registry

    for module in registry.file_plugin_modules():
        cloudpickle.register_pickle_by_value(module)  # workers cannot import a recipe's .py plug-ins
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # same shard contents as an in-process run
    context.enable_progress_bars = False  # bricks-dj shows its own progress
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its per-run INFO lines would interleave
    items = [{"index": i, "uri": u} for i, u in sources]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4096)))
    ds = ds.map_batches(_ray_batch, fn_kwargs={"plan": plan, "frames_to": frames_to}, batch_size=1,
                        batch_format="pyarrow",
                        num_cpus=plan.cpus_per_source)
    schema = result_schema(plan)
    for k, step in enumerate(plan.model_steps):
        # Pre-processing is a CPU stage of its own, so the model's actors never wait on it.
        # Its half CPU also keeps Ray from fusing it into the decode tasks or the actors
        # (fused into an actor pool, decoding would run on `pool_size` workers only).
        ds = ds.map_batches(preprocess_table, fn_kwargs={"step": step, "schema": schema},
                            batch_format="pyarrow", num_cpus=0.5)
        with warnings.catch_warnings():
            # No actor restarts: Ray Data hands its actors their constructor arguments through
            # the object store, from which Ray cannot restart an actor reliably (ray-project/ray#53727;
            # Ray logs an error saying so). An actor that dies stops the run; rerunning resumes.
            # Ray 2.60 has no named parameter for it yet, only the deprecated remote arguments.
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
            ds = ds.map_batches(ModelActor, fn_constructor_args=(plan, k), batch_size=step.op.params.batch_size,
                                batch_format="pyarrow",
                                compute=ray.data.ActorPoolStrategy(size=step.op.params.pool_size),
                                max_restarts=0, **ray_resources(step.op))
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
