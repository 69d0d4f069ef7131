"""Runners: where `process_source` runs. In-process (debugging, tests) or on Ray: one task per
source, or, with model operators, Ray Data's stages with the models' actor pools.

Both yield the same thing, tables of rows (see `rows`) for the driver to commit, so Ray and
in-process runs produce identical shards. Kept rows never reach the driver: the worker that
holds them last (the source's task, or the last model stage) writes them to staged shard
files (`write_kept`), and only the files' names and row counts travel on.
"""

from __future__ import annotations

import copy
import itertools
import logging
import pickle
import socket
import sys
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import pyarrow as pa

from . import output, rows
from .live_frames import FrameBoard, Sink, mirrored_from_ray, reporting
from .model_stage import ModelActor, preprocess_table, row_table
from .pipeline import process_source
from .plan import Plan
from .ray_cluster import init_ray
from .segments import MapFn, thread_map

log = logging.getLogger("bricks")

Source = tuple[int, str, "dict | None"]
"""A source to process: its index in the run, its URI, and the fields a data-set file gave it."""


def node_id() -> str:
    """The Ray node this process runs on, or this host's name outside Ray."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return socket.gethostname()


def _process(plan: Plan, out: str, index: int, uri: str, fields: dict | None, frames_to: Sink | None = None,
             segment_map: MapFn | None = None) -> pa.Table:
    with reporting(frames_to, uri):
        result = process_source(plan, uri, segment_map, fields)
    stats = dict(result.stats(), node=node_id())
    table = rows.source_table(plan.result_schema, index, uri, result.kept, result.rejects, stats)
    return table if plan.model_steps else write_kept(table, plan, out)


def write_kept(table: pa.Table, plan: Plan, out: str) -> pa.Table:
    """`table` with its kept rows written to staged shard files of `out`, each within the shard
    limits (see `rows.write_kept`)."""
    return rows.write_kept(table, plan.schema,
                           lambda kept: [output.stage_part(out, chunk) for chunk in shard_chunks(kept, plan)])


def merge_function(out: str, ray_mode: bool):
    """How a commit merges small staged parts: here, or in a Ray task (which needs no CPU of
    its own: it reads and writes Parquet), so that their bytes stay off the driver."""
    if not ray_mode:
        return lambda parts: output.merge_parts(out, parts)

    def merge_on_ray(parts):
        import ray

        return ray.get(ray.remote(num_cpus=0)(output.merge_parts).remote(out, parts))

    return merge_on_ray


def shard_chunks(table: pa.Table, plan: Plan) -> list[pa.Table]:
    """`table` in pieces within `rows_per_shard` and `shard_mb` (one source with very many clips)."""
    if table.num_rows == 0:
        return []
    ex = plan.executor
    per_row = max(1, table.nbytes // table.num_rows)
    size = max(1, min(ex.rows_per_shard, (ex.shard_mb << 20) // per_row))
    return [table.slice(i, size) for i in range(0, table.num_rows, size)]


# In-process runs work on this many sources at once: while one source's last shots go
# through the operators (on one thread), the next one is already decoding.
LOCAL_SOURCES_IN_FLIGHT = 2


def run_local(plan: Plan, sources: list[Source], out: str,
              board: FrameBoard | None = None) -> Iterator[pa.Table]:
    # Each source in flight has operators of its own, as each Ray worker has, so that no
    # operator instance ever sees two sources at once.
    plans = [plan] + [copy.deepcopy(plan) for _ in range(LOCAL_SOURCES_IN_FLIGHT - 1)]
    for each in plans:
        each.setup()
    actors = {step.label: ModelActor(plan, k) for k, step in enumerate(plan.model_steps)}
    segments = thread_map(LOCAL_SOURCES_IN_FLIGHT)
    queued = iter(enumerate(sources))
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(LOCAL_SOURCES_IN_FLIGHT, thread_name_prefix="bricks-source") as pool:

        def submit_next() -> None:
            item = next(queued, None)
            if item is not None:
                # Source k is submitted once source k - IN_FLIGHT is done, so its plan is free.
                k, (index, uri, fields) = item
                pending.append(pool.submit(_process, plans[k % len(plans)], out, index, uri, fields, board, segments))

        try:
            for _ in plans:
                submit_next()
            while pending:
                table = pending.popleft().result()
                submit_next()
                for step in plan.final_steps:
                    if step.label in actors:
                        table = actors[step.label](preprocess_table(table, step, plan.schema))
                    else:
                        table = row_table(table, step, plan.schema)
                yield write_kept(table, plan, out) if plan.model_steps else table
        finally:
            for future in pending:  # the caller stopped early: do not start what waits
                future.cancel()


def _ray_source(plan: Plan, out: str, source: Source, frames_to: Sink | None) -> pa.Table:
    plan.setup()  # cheap and idempotent for the per-source operators
    return _process(plan, out, *source, frames_to, _ray_map)


def _ray_map(fn, items) -> list:
    """A long source's segments as Ray tasks of one CPU each (the task waiting on them lends
    its own CPU back to Ray meanwhile)."""
    import ray

    task = ray.remote(num_cpus=1)(fn)
    return ray.get([task.remote(item) for item in items])


# Ray tasks submitted per CPU slot ahead of the results taken: Ray starts a queued task as soon
# as a worker is free, so no worker waits for the driver, and a source slower than the next
# few holds none of them up. The finished tables wait in the object store, in order.
TASKS_AHEAD_PER_SLOT = 4


def _ray_tasks(plan: Plan, sources: list[Source], out: str, frames_to: Sink | None) -> Iterator[pa.Table]:
    """One Ray task per source, results in source order: recipes without model operators.

    Not Ray Data: on a small machine its executor costs as much as the work. Before the first
    source it starts actors of its own (statistics, autoscaling), each a new worker process, and
    it looks for finished tasks every 0.1 s, so each worker idles that long between sources."""
    import ray

    resources = plan.source_resources
    slots = max(1, int(ray.cluster_resources().get("CPU", 1) // resources.cpus))
    task = ray.remote(**_ray_resources(resources))(_ray_source)
    shared_plan = ray.put(plan)  # serialised once, not once per source
    queued = iter(sources)
    pending = deque(task.remote(shared_plan, out, source, frames_to)
                    for source in itertools.islice(queued, slots * TASKS_AHEAD_PER_SLOT))
    try:
        while pending:
            table = ray.get(pending.popleft())
            for source in itertools.islice(queued, 1):
                pending.append(task.remote(shared_plan, out, source, frames_to))
            yield table
    finally:
        for ref in pending:  # the caller stopped early: do not run what waits
            ray.cancel(ref)


def _ray_batch(batch: pa.Table, plan: Plan, out: str, frames_to: Sink | None) -> pa.Table:
    # Operators' setup is cheap and idempotent for CPU operators; model operators run in
    # actor pools of their own.
    plan.setup()
    tables = [_process(plan, out, index, uri, pickle.loads(fields) if fields else None, frames_to, _ray_map)
              for index, uri, fields in zip(*(batch.column(c).to_pylist() for c in ("index", "uri", "fields")))]
    return pa.concat_tables(tables)


def run_ray(plan: Plan, sources: list[Source], out: str,
            board: FrameBoard | None = None) -> Iterator[pa.Table]:
    init_ray(plan.executor)  # before `import ray`: some of its settings are read on import
    with mirrored_from_ray(board) as frames_to:
        if plan.model_steps:  # actor pools: Ray Data's streaming stages
            yield from _ray_results(plan, sources, out, frames_to)
        else:
            yield from _ray_tasks(plan, sources, out, frames_to)


def _ray_results(plan: Plan, sources: list[Source], out: str, frames_to: Sink | None) -> Iterator[pa.Table]:
    import ray
    from ray import cloudpickle

    from . import registry

    for module in registry.file_plugin_modules():
        cloudpickle.register_pickle_by_value(module)  # workers cannot import a recipe's .py plug-ins
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # same shard contents as an in-process run
    context.enable_progress_bars = False  # bricks-dj shows its own progress
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its per-run INFO lines would interleave
    # A data set's fields travel pickled: Arrow would need one type for each across all sources.
    items = [{"index": i, "uri": u, "fields": pickle.dumps(f) if f else b""} for i, u, f in sources]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4096)))
    ds = ds.map_batches(_ray_batch, fn_kwargs={"plan": plan, "out": out, "frames_to": frames_to}, batch_size=1,
                        batch_format="pyarrow", **_ray_resources(plan.source_resources))
    model_index = {step.label: k for k, step in enumerate(plan.model_steps)}
    for step in plan.final_steps:
        if step.label not in model_index:  # a filter or mapper on the rows' fields
            ds = ds.map_batches(row_table, fn_kwargs={"step": step, "shard": plan.schema}, batch_format="pyarrow",
                                num_cpus=0.5)
            continue
        k = model_index[step.label]
        # Pre-processing is a CPU stage of its own, so the model's actors never wait on it.
        # Its half CPU also keeps Ray from fusing it into the decode tasks or the actors
        # (fused into an actor pool, decoding would run on `pool_size` workers only).
        ds = ds.map_batches(preprocess_table, fn_kwargs={"step": step, "shard": plan.schema},
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
                                max_restarts=0, **_ray_resources(step.op.resources))
    if plan.model_steps:  # the kept rows are written where the last model stage left them
        ds = ds.map_batches(write_kept, fn_kwargs={"plan": plan, "out": out}, batch_format="pyarrow", num_cpus=0.5)
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


def _ray_resources(resources) -> dict[str, float]:
    return {"num_cpus": resources.cpus, **({"num_gpus": resources.gpus} if resources.gpus else {})}
