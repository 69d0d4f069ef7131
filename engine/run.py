"""Running a recipe end to end: sources in, shards, rejects and a manifest out; resumable."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from . import plan as plan_mod
from . import rows
from .dataset_card import write_card
from .extras import check_plan
from .inputs import input_folders, read_inputs
from .dataset_files import DatasetInput
from .live_frames import FrameBoard
from .operator import FatalModelError
from .output import (OutputError, Progress, ShardWriter, check_location, claim, discard_uncommitted, prepare,
                     write_manifest)
from .ray_cluster import cluster_address, init_ray
from .recipe import Recipe
from .runners import merge_function, run_local, run_ray
from .schema import SCHEMA_VERSION
from .store import open_store

if TYPE_CHECKING:
    from .report import ReportOptions

log = logging.getLogger("bricks")

# Either build of scenedetect and OpenCV (the headless ones are the dependencies), whichever is here.
VERSIONED = ("bricks", "av", "scenedetect", "scenedetect-headless", "opencv-python", "opencv-python-headless",
             "pyarrow", "ray", "numpy", "pydantic")


@dataclass
class SourceDone:
    """What a progress display hears after each source."""

    uri: str
    status: str
    kept: int
    rejected: int
    frames: int


def run(recipe: Recipe, *, overwrite: bool = False, mode: str | None = None,
        on_start: Callable[[int, int], None] | None = None,
        on_source: Callable[[SourceDone], None] | None = None,
        frames: FrameBoard | None = None, report: ReportOptions | None = None) -> dict[str, Any]:
    """Run `recipe`; returns the manifest. Sources already committed in the output are skipped.
    `frames`, if given, holds the frames decoded so far in the sources in flight; `report`, the
    options of the report the run ends with (default: `bricks-dj report`'s)."""
    started = time.time()
    plan, inputs = preflight(recipe, mode)
    sources = inputs.uris
    out = recipe.model.output  # text: a local folder or an object-store URI
    with claim(out, input_folders(recipe.model.input)):  # held until the manifest is written
        progress = prepare(out, plan.recipe_key, overwrite)
        todo = [(i, uri, inputs.fields.get(uri)) for i, uri in enumerate(sources) if uri not in progress.done_sources]
        if on_start:
            on_start(len(sources), len(sources) - len(todo))
        ex = plan.executor
        on_ray = (mode or ex.mode) == "ray"
        writer = ShardWriter(out, progress, ex.rows_per_shard, ex.shard_mb << 20, merge=merge_function(out, on_ray))
        runner = run_ray if on_ray else run_local
        pending: dict[int, list[pa.Table]] = {}
        received = 0  # bytes of row tables the driver was sent (no media: workers write those)
        try:
            for table in _unwrap_errors(runner(plan, todo, out, frames) if todo else ()):
                received += table.nbytes
                for index in pc.unique(table.column("_source_index")).to_pylist():
                    piece = table.filter(pc.equal(table.column("_source_index"), index))
                    pending.setdefault(index, []).append(piece)
                    if sum(rows.row_count(t) for t in pending[index]) == piece.column("_source_rows")[0].as_py():
                        _complete(plan, writer, pa.concat_tables(pending.pop(index)), on_source)
            writer.commit()
        except BaseException:
            # Sources still in flight staged parts that no commit will name.
            discard_uncommitted(out)
            raise
        if pending:
            raise RuntimeError(f"internal error: {len(pending)} sources returned incomplete results")
        manifest = build_manifest(recipe, plan, progress, len(sources), len(sources) - len(todo), started)
        manifest["driver"] = {"bytes_received": received}
        manifest["dataset_card"] = write_card(open_store(out), manifest,
                                              {c: s.op.name for s in plan.steps for c in s.op.outputs})
        manifest["report"] = write_run_report(out, manifest, report)
        write_manifest(out, manifest)
    return manifest


def write_run_report(out: str, manifest: dict[str, Any], options: ReportOptions | None = None) -> dict[str, Any]:
    """OUT/report.html; a report that cannot be made costs the run nothing but one warning."""
    from .report import REPORT, write_report

    return report_outcome(lambda: write_report(out, options, manifest=manifest), REPORT)


def report_outcome(write, name: str) -> dict[str, Any]:
    """`write()` a report; what the manifest records of it: written, or why not (one warning)."""
    try:
        write()
        return {"written": True, "file": name}
    except Exception as exc:  # the output is complete: no error of the report may lose it
        text = str(exc).splitlines()[0] if str(exc) else ""
        reason = text if type(exc).__name__ == "ReportError" else f"{type(exc).__name__}: {text}"
        log.warning("report not written: %s", reason)
        return {"written": False, "reason": reason}


def _unwrap_errors(tables):
    """A model operator's fatal error, or a worker's error writing the output, surfaces as
    itself, not wrapped by Ray."""
    try:
        yield from tables
    except Exception as exc:
        cause = exc
        while cause is not None and not isinstance(cause, (FatalModelError, OutputError)):
            cause = getattr(cause, "cause", None) or cause.__cause__
        if cause is not None and cause is not exc:
            raise type(cause)(str(cause).splitlines()[0]) from exc
        raise


def preflight(recipe: Recipe, mode: str | None = None) -> tuple[plan_mod.Plan, DatasetInput]:
    """What `run` checks before it writes or decodes anything, and all that `bricks-dj validate`
    does: the operators, their order and extras; each model operator's device, weights and
    endpoint; the inputs; where the output goes; and, for a run that joins a Ray cluster, that
    the cluster is there."""
    plan = plan_mod.build(recipe)  # the operators are checked before the inputs are read
    check_plan(plan, recipe.source)
    check_models(plan)
    inputs = read_inputs(recipe.model.input)
    if inputs.columns:
        plan = plan_mod.build(recipe, inputs.columns)
    check_location(recipe.model.output, input_folders(recipe.model.input))
    if (mode or plan.executor.mode) == "ray" and cluster_address(plan.executor):
        init_ray(plan.executor)
    return plan, inputs


def check_models(plan) -> None:
    """Before any video is decoded: every model operator has its device and its weights."""
    from .model_stage import resolve_device
    from bricks.common.weights import resolve

    for step in plan.model_steps:
        resolve_device(step.op, warn=False)
        for spec in step.op.model_files():
            resolve(spec)
        step.op.check()


def _complete(plan, writer: ShardWriter, table: pa.Table, on_source) -> None:
    stats = rows.source_stats(table)
    if plan.model_steps:
        rows.add_model_stats([s.label for s in plan.final_steps], table, stats)
    kept, rejects, parts = rows.split(table, plan.schema)
    if kept.num_rows:
        raise RuntimeError("internal error: kept rows reached the driver unwritten")
    writer.add(stats["uri"], parts, rejects, stats)
    if on_source:
        on_source(SourceDone(stats["uri"], stats["status"], sum(p["rows"] for p in parts), rejects.num_rows,
                             stats["frames_decoded"]))


def build_manifest(recipe: Recipe, plan, progress: Progress, total: int, resumed: int,
                   started: float) -> dict[str, Any]:
    ops = []
    for step in plan.steps:
        stats = progress.ops.get(step.label)
        entry = {"index": step.index, "name": step.op.name}
        entry.update(stats.to_dict() if stats else {"in": 0, "out": 0, "dropped": 0, "failed": 0, "seconds": 0.0})
        ops.append(entry)
    status = progress.source_status
    return {
        "schema_version": SCHEMA_VERSION,
        "recipe": recipe.to_dict(),
        "recipe_key": plan.recipe_key,
        "versions": _versions(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "elapsed_seconds": round(time.time() - started, 3),
        "sources": {"total": total, "done": len(progress.done_sources), "skipped_as_done": resumed, **status,
                    "by_node": dict(sorted(progress.nodes.items()))},
        "accounted": sum(status.values()) == len(progress.done_sources),
        "samples": dict(progress.samples, total=sum(progress.samples.values())),
        "rejects": progress.rejects,
        "ops": ops,
        "decode": {"frames": progress.frames_decoded, "seconds": round(progress.decode_seconds, 3),
                   "skipped_packets": sum(progress.skipped_packets.values()),
                   "skipped_packets_by_source": dict(sorted(progress.skipped_packets.items()))},
        "shards": progress.shards,
        "columns": {f.name: str(f.type) for f in plan.schema},
    }


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found
