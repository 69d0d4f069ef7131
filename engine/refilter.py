"""`bricks-dj refilter OUT --set process.<op>.<threshold>=V`: which samples the recipe would
keep with other thresholds, decided from the scores OUT stored, without decoding a frame.

OUT is only read. Without `--to`, the what-if manifest (the new recipe, its per-operator
counts, and what it was made from under `refilter`) goes to OUT/whatif/manifest.json; with
`--to DIR`, DIR becomes a bricks output of the new recipe (shards, rejects, ledger, manifest,
dataset card), the rows a re-run would write, for `bricks-train` and `bricks-dj export`.
What can change and how it is decided: see `replay`.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import click
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError
from pydantic_core import to_jsonable_python

from bricks.common.settings import SettingsError, apply_override, parse_overrides

from . import plan as plan_mod
from .dataset_card import write_card
from .output import (MANIFEST, RUN_INFO, Ledger, Progress, ShardWriter, claim, merge_parts, prepare, read_ledger,
                     refuse_foreign, stage_part, write_manifest)
from .pipeline import OpStats
from .recipe import Recipe, RecipeError, from_dict
from .registry import RegistryError, get as get_operator
from .replay import Outcome, RefilterError, Replay, Stored, check_changes, replayed_steps, step_of
from .rows import DROPPED, FAILED, KEPT
from .run import build_manifest
from .schema import REJECT_COLUMNS, rejects_schema, sample_id, to_table
from .store import OutputError, Store, open_store, store_errors

WHATIF = "whatif/manifest.json"
WHATIF_REPORT = "whatif/report.html"


@dataclass
class SourceRows:
    """One source's rows in an output, in the order they were written."""

    uri: str
    kept: list[dict[str, Any]]
    rejects: list[dict[str, Any]]


@dataclass
class Result:
    manifest: dict[str, Any]  # the what-if manifest (a report can be written from it)
    before: dict[str, OpStats]  # per step label, as OUT recorded
    after: dict[str, OpStats]
    written_to: str  # the manifest's location


def refilter(out: str, overrides: list[str], to: str | None = None) -> Result:
    """The what-if of `overrides` (`process.<op>.<param>=VALUE`) on the output `out`, written to
    `to` (a new output) or to OUT/whatif/manifest.json. One-line `RefilterError` (or
    `OutputError`) when it cannot be answered from the stored rows."""
    started = time.time()
    store = open_store(out)
    with store_errors(store):
        manifest, ledger = _read_output(store)
        old, new, changed = _recipes(store, manifest, overrides, to)
        old_plan, new_plan = plan_mod.build(old), plan_mod.build(new)
        if old_plan.recipe_key != manifest.get("recipe_key"):
            raise RefilterError(f"{store.show(MANIFEST)}: its recipe does not give its recipe key here (written by "
                                "another bricks version, or with other plug-ins); re-run the recipe")
        check_changes(new_plan, changed)
        schema, sources = _read_rows(store, ledger)
    before = _original_counts(ledger)
    _check_replay(old_plan, set(changed), sources, before, store)
    replay = Replay(new_plan, set(changed))
    outcome = {uri: _refiltered(replay, rows, new_plan.recipe_key) for uri, rows in sources.items()}
    after = _merged_counts(ledger, outcome, {s.label for s in replayed_steps(new_plan)})
    progress = _progress(ledger, outcome, after)
    total = manifest["sources"]["total"]
    note = {"from": store.uri, "set": list(overrides), "recipe_key": manifest["recipe_key"],
            "brought_back": sum(o["brought_back"] for o in outcome.values()),
            "note": "decided from the stored scores; nothing was decoded, no model ran"}
    if to is None:
        whatif = build_manifest(new, new_plan, progress, total, 0, started)
        whatif.update(refilter=note, columns={f.name: str(f.type) for f in schema}, shards=[])
        whatif["decode"] = {"frames": 0, "seconds": 0.0, "skipped_packets": 0, "skipped_packets_by_source": {}}
        with store_errors(store):
            _write_whatif(store, whatif)  # first: the what-if report refuses a folder that is not bricks'
        whatif["report"] = _whatif_report(store, whatif, outcome)
        with store_errors(store):
            _write_whatif(store, whatif)
        return Result(whatif, before, after, store.show(WHATIF))
    written = _write_output(to, new, new_plan, schema, ledger, outcome, total, note, started)
    return Result(written, before, after, open_store(to).show(MANIFEST))


# -- reading OUT ----------------------------------------------------------------------------------

def _read_output(store: Store) -> tuple[dict[str, Any], Ledger]:
    if not store.isfile(RUN_INFO) or not store.isfile(MANIFEST):
        raise RefilterError(f"{store.uri} is not a finished bricks-dj output (it has no {MANIFEST} or {RUN_INFO})")
    try:
        manifest = json.loads(store.read_text(MANIFEST))
        recorded = json.loads(store.read_text(RUN_INFO)).get("recipe_key")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise RefilterError(f"{store.show(MANIFEST)}: not the manifest bricks-dj writes") from None
    if not isinstance(manifest, dict) or "recipe" not in manifest or manifest.get("recipe_key") != recorded:
        raise RefilterError(f"{store.show(MANIFEST)}: not the manifest of the run in {store.uri}")
    ledger = read_ledger(store)
    done = {s for e in ledger.entries for s in e["sources"]}
    sources = manifest.get("sources", {})
    if len(done) != sources.get("done") or sources.get("done") != sources.get("total"):
        raise RefilterError(f"{store.uri}: the run is not finished ({len(done)} of {sources.get('total')} sources "
                            "committed, or a run is writing it); finish it first")
    return manifest, ledger


def _recipes(store: Store, manifest: dict[str, Any], overrides: list[str],
             to: str | None) -> tuple[Recipe, Recipe, dict[int, list[str]]]:
    """The recipe that wrote OUT, the one with `overrides` (writing to `to`, where given), and
    the parameters changed per step."""
    where = store.show(MANIFEST)
    if not overrides:
        raise RefilterError("give at least one --set process.<operator>.<threshold>=VALUE")
    data = copy.deepcopy(manifest["recipe"])
    try:
        data["process"] = [_loadable(item) for item in data["process"]]
        old = from_dict(copy.deepcopy(data), where=where)
        for keys, value in parse_overrides(list(overrides)):
            if keys[0] != "process" or len(keys) < 3:
                raise RefilterError(f"--set {'.'.join(keys)}: refilter changes thresholds only "
                                    "(process.<operator>.<param>=VALUE)")
            apply_override(data, keys, value, where)
        if to is not None:  # the new output's manifest names the recipe that would write it
            data["output"] = to
        new = from_dict(data, where=where)
    except SettingsError as exc:  # RecipeError is one
        raise RefilterError(str(exc)) from None
    except RegistryError as exc:
        raise RefilterError(f"{where}: {exc}") from None
    if [op.name for op in old.ops] != [op.name for op in new.ops]:
        raise RefilterError(f"--set: refilter changes parameters, not the operators of {where}")
    changed = {}
    for index, (a, b) in enumerate(zip(old.ops, new.ops)):
        pa_, pb = a.params.model_dump(), b.params.model_dump()
        names = [k for k in pb if pa_.get(k) != pb[k]]
        if names:
            changed[index] = names
    if not changed:
        raise RefilterError(f"--set {' '.join(overrides)}: changes no parameter of the recipe in {where}")
    return old, new, changed


def _loadable(item: dict[str, Any]) -> dict[str, Any]:
    """A manifest's process item as a recipe gives it. The manifest lists every parameter,
    defaults too; where a parameter's validator refuses one given for nothing (shot_split's
    model settings with another detector), the defaults are left out, as the recipe had them."""
    (name, params), = item.items()
    cls = get_operator(name)
    try:
        cls.Params.model_validate(params or {})
        return item
    except ValidationError:
        fields = cls.Params.model_fields
        return {name: {k: v for k, v in (params or {}).items()
                       if k not in fields or v != to_jsonable_python(fields[k].get_default(call_default_factory=True))}}


def _read_rows(store: Store, ledger: Ledger) -> tuple[pa.Schema, dict[str, SourceRows]]:
    """Every committed row, by source in commit order."""
    sources: dict[str, SourceRows] = {}
    for entry in ledger.entries:
        for uri in entry["sources"]:
            sources[uri] = SourceRows(uri, [], [])
    schema = None
    for entry in ledger.entries:
        for shard in entry["shards"]:
            table = _parquet(store, shard["file"])
            schema = schema or table.schema
            for row in table.to_pylist():
                sources[row["source_uri"]].kept.append(row)
        for name in entry["reject_files"]:
            table = _parquet(store, name)
            if "fields" not in table.column_names:
                raise RefilterError(f"{store.show(name)}: rejects without the samples' fields (written by an earlier "
                                    "bricks-dj): re-run the recipe to refilter its output")
            for row in table.to_pylist():
                sources[row["source_uri"]].rejects.append(row)
    if schema is None:
        raise RefilterError(f"{store.uri} kept no samples: there are no stored rows to take the columns from")
    return schema, sources


def _parquet(store: Store, name: str) -> pa.Table:
    with store.fs.open(store.path(name), "rb") as f:
        return pq.read_table(f)


# -- deciding ---------------------------------------------------------------------------------------

def _stored(rows: SourceRows, replayed: set[int]) -> tuple[list[Stored], list[dict[str, Any]]]:
    """A source's samples that reached the replayed steps, and the rejects from before them."""
    stored = [Stored(rows.uri, KEPT, None, row) for row in rows.kept]
    earlier = []
    for reject in rows.rejects:
        at = step_of(reject["op"])
        if at in replayed:
            fields = json.loads(reject["fields"]) if reject["fields"] else None
            if fields is None:
                raise RefilterError(f"sample {reject['sample_id']} of {rows.uri}: its reject holds no fields")
            stored.append(Stored(rows.uri, reject["status"], at, fields, reject))
        else:
            earlier.append(reject)
    return stored, earlier


def _check_replay(plan: plan_mod.Plan, changed: set[int], sources: dict[str, SourceRows],
                  before: dict[str, OpStats], store: Store) -> None:
    """With OUT's own recipe, the stored rows must give what OUT decided: each sample's outcome
    (the changed steps deciding again from their stored scores, the others as they did) and
    OUT's counts. Where they do not, the stored scores do not hold what the steps decided on."""
    replay = Replay(plan, changed, checking=True)
    counts: dict[str, OpStats] = {}
    replayed = {s.index for s in replay.steps}
    for rows in sources.values():
        for sample, got in _decided(replay, _stored(rows, replayed)[0], counts):
            if got.brought_back or got.status != sample.status or \
                    (got.reject or {}).get("op") != (sample.reject or {}).get("op"):
                was = sample.reject["op"] if sample.reject else None
                now = got.reject["op"] if got.reject else None
                which = sample.reject["sample_id"] if sample.reject else sample.row.get("sample_id")
                raise RefilterError(f"{store.uri}: sample {which} was {_outcome(sample.status, was)}, but its stored "
                                    f"scores give {_outcome(got.status, now)} with the recipe's own thresholds; "
                                    "re-run the recipe")
    for step in replay.steps:
        got, want = counts.get(step.label, OpStats()), before.get(step.label, OpStats())
        if (got.n_in, got.n_out, got.dropped, got.failed) != (want.n_in, want.n_out, want.dropped, want.failed):
            raise RefilterError(f"{store.uri}: its stored rows do not give its own counts for {step.label} "
                                f"({got.n_in} in, {got.n_out} out here; {want.n_in} in, {want.n_out} out recorded); "
                                "re-run the recipe")


def _decided(replay: Replay, stored: list[Stored], counts: dict[str, OpStats]) -> list[tuple[Stored, Outcome]]:
    """Each sample with its outcome. Across a fan-out that keeps its parent, a clip and the
    samples made from it (found within its frame range) are decided together
    (`Replay.run_group`): a clip that a filter before the fan-out now drops gives one reject,
    paired with the clip's row, and the samples made from it are gone."""
    keeper = replay.keeper
    if keeper is None:
        return [(sample, replay.run(sample, counts)) for sample in stored]
    alone, groups, placed = [], {}, set()
    for sample in stored:
        if sample.status != KEPT and sample.at <= keeper.index:
            alone.append(sample)  # dropped or failed before the fan-out made anything of it
        elif keeper.op.applies_to(sample.row):  # the clip, the fan-out's first child
            groups[(sample.row["start_frame"], sample.row["end_frame"])] = [sample]
        else:
            continue
        placed.add(id(sample))
    for sample in stored:
        if id(sample) in placed:
            continue
        start, end = sample.row["start_frame"], sample.row["end_frame"]
        parent = next((k for k in groups if k[0] <= start and end <= k[1]), None)
        if parent is None:
            alone.append(sample)  # not made by the fan-out
        else:
            groups[parent].append(sample)
    decided = [(sample, replay.run(sample, counts)) for sample in alone]
    for clip, *made in groups.values():
        outcomes = replay.run_group(clip, [clip, *made], counts)
        decided += list(zip([clip, *made], outcomes))
    return decided


def _outcome(status: str, op: str | None) -> str:
    return f"{status} by {op}" if op else status


def _refiltered(replay: Replay, rows: SourceRows, key: str) -> dict[str, Any]:
    """One source under the new thresholds: kept rows and rejects (ids of the new recipe) and
    its counts for the replayed steps."""
    stored, earlier = _stored(rows, {s.index for s in replay.steps})
    counts: dict[str, OpStats] = {}
    kept, rejects, back = [], [_renamed_reject(r, key) for r in earlier], 0
    for _, outcome in _decided(replay, stored, counts):
        back += outcome.brought_back
        if outcome.status == KEPT:
            kept.append(_renamed(outcome.row, key))
        else:
            rejects.append(_renamed_reject(outcome.reject, key))
    kept.sort(key=lambda r: r["start_frame"])  # stable: a brought-back clip among its siblings, as a run writes
    status = KEPT if kept else FAILED if any(r["status"] == FAILED for r in rejects) else DROPPED
    return {"kept": kept, "rejects": rejects, "ops": counts, "status": status, "brought_back": back}


def _renamed(row: dict[str, Any], key: str) -> dict[str, Any]:
    """The row with the id the new recipe gives it (ids depend on the recipe)."""
    if row.get("sample_id") is None or row.get("kind") not in ("video", "image"):
        return row
    return dict(row, sample_id=sample_id(row["source_uri"], key, row["kind"], row["start_frame"], row["end_frame"]))


def _renamed_reject(reject: dict[str, Any], key: str) -> dict[str, Any]:
    renamed = _renamed(reject, key)
    if renamed is not reject and reject.get("fields"):
        fields = json.loads(reject["fields"])
        fields["sample_id"] = renamed["sample_id"]
        renamed["fields"] = json.dumps(fields, sort_keys=True)
    return {name: renamed.get(name) for name in REJECT_COLUMNS}


def _original_counts(ledger: Ledger) -> dict[str, OpStats]:
    progress = Progress()
    for entry in ledger.entries:
        progress.record(entry)
    return progress.ops


def _merged_counts(ledger: Ledger, outcome: dict[str, dict[str, Any]], replayed: set[str]) -> dict[str, OpStats]:
    """Per step: OUT's counts for the steps before the replayed ones, the new counts for these;
    seconds are those OUT's run spent (refiltering spends none in the operators)."""
    before = _original_counts(ledger)
    after: dict[str, OpStats] = {}
    for label, stats in before.items():
        after[label] = OpStats(seconds=stats.seconds) if label in replayed else copy.copy(stats)
    for result in outcome.values():
        for label, stats in result["ops"].items():
            mine = after.setdefault(label, OpStats())
            mine.add(OpStats(stats.n_in, stats.n_out, stats.dropped, stats.failed))
    return after


def _progress(ledger: Ledger, outcome: dict[str, dict[str, Any]], ops: dict[str, OpStats]) -> Progress:
    """What a ledger of the new outcome would say (for the what-if manifest)."""
    progress = Progress(ops=ops)
    for entry in ledger.entries:
        progress.skipped_packets.update(entry.get("skipped_packets", {}))
        for node, count in entry.get("nodes", {}).items():
            progress.nodes[node] = progress.nodes.get(node, 0) + count
    for uri, result in outcome.items():
        progress.done_sources.add(uri)
        progress.source_status[result["status"]] += 1
        for row in result["kept"]:
            progress.samples[row["kind"]] += 1
        for reject in result["rejects"]:
            progress.rejects[reject["status"]] += 1
    return progress


# -- writing ------------------------------------------------------------------------------------------

def _whatif_report(store: Store, manifest: dict[str, Any], outcome: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """OUT/whatif/report.html: the report of the what-if's rows, held here (thumbnails come from
    their media or their source, as in any report)."""
    from .report.gather import from_rows
    from .report.page import write_report_of
    from .run import report_outcome

    kept = [row for result in outcome.values() for row in result["kept"]]
    rejects = [row for result in outcome.values() for row in result["rejects"]]
    return report_outcome(lambda: write_report_of(from_rows(store, manifest, kept, rejects), WHATIF_REPORT),
                          WHATIF_REPORT)


def whatif_is_ours(store: Store) -> bool | None:
    """True when OUT/whatif/manifest.json is refilter's, False when it is someone else's, None
    when there is none."""
    if not store.isfile(WHATIF):
        return None
    try:
        return "refilter" in json.loads(store.read_text(WHATIF))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
        return False


def _write_whatif(store: Store, manifest: dict[str, Any]) -> None:
    """OUT/whatif/manifest.json, bricks' own: one written earlier by refilter is replaced,
    anything else there is refused."""
    if whatif_is_ours(store) is False:
        raise OutputError(f"{store.show(WHATIF)} is not a what-if manifest bricks-dj wrote; move it elsewhere")
    store.makedirs("whatif")
    store.write(WHATIF, json.dumps(manifest, indent=2))


def _write_output(to: str, recipe: Recipe, plan: plan_mod.Plan, schema: pa.Schema, ledger: Ledger,
                  outcome: dict[str, dict[str, Any]], total: int, note: dict[str, Any], started: float) -> dict[str, Any]:
    """DIR as the output of the new recipe: committed source by source, as a run commits."""
    dest = open_store(to)
    with store_errors(dest):
        if dest.isfile(RUN_INFO) or (dest.isdir() and dest.list()):
            raise OutputError(f"--to {dest.uri} is not empty; choose a new or empty folder")
    with claim(dest) as store:
        with store_errors(store):
            refuse_foreign(store, Ledger())
        progress = prepare(store, plan.recipe_key, overwrite=False)
        ex = plan.executor
        writer = ShardWriter(store, progress, ex.rows_per_shard, ex.shard_mb << 20,
                             merge=lambda parts: merge_parts(store, parts))
        original = {uri: entry for entry in ledger.entries for uri in entry["sources"]}
        first = {entry["sources"][0] for entry in ledger.entries if entry["sources"]}
        replayed = {s.label for s in replayed_steps(plan)}
        for uri, result in outcome.items():
            kept = to_table(result["kept"], schema)
            parts = [stage_part(store, kept.slice(k, ex.rows_per_shard))
                     for k in range(0, kept.num_rows, ex.rows_per_shard)]
            rejects = pa.Table.from_pylist(result["rejects"], schema=rejects_schema())
            writer.add(uri, parts, rejects, _source_stats(uri, result, original[uri], uri in first, replayed))
        writer.commit()
        manifest = build_manifest(recipe, plan, progress, total, 0, started)
        manifest.update(refilter=note, columns={f.name: str(f.type) for f in schema})
        manifest["dataset_card"] = write_card(store, manifest, {c: s.op.name for s in plan.steps for c in s.op.outputs})
        write_manifest(store, manifest)
    return manifest


def _source_stats(uri: str, result: dict[str, Any], entry: dict[str, Any], first: bool,
                  replayed: set[str]) -> dict[str, Any]:
    """A source's statistics for the ledger. OUT's ledger counts the steps before the replayed
    ones (and seconds) per commit: they go with the first source of that commit."""
    ops: dict[str, dict[str, Any]] = {}
    for label, stats in entry["ops"].items():
        if first:
            ops[label] = {**stats, "in": 0, "out": 0, "dropped": 0, "failed": 0} if label in replayed else dict(stats)
    for label, stats in result["ops"].items():
        mine = OpStats.from_dict(ops[label]) if label in ops else OpStats()
        mine.add(OpStats(stats.n_in, stats.n_out, stats.dropped, stats.failed))
        ops[label] = mine.to_dict()
    skipped = entry.get("skipped_packets", {}).get(uri, 0)
    return {"uri": uri, "status": result["status"], "ops": ops, "frames_decoded": 0, "decode_seconds": 0.0,
            "skipped_packets": skipped}


# -- the command ----------------------------------------------------------------------------------------

@click.command("refilter")
@click.argument("out")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="A filter's threshold, e.g. process.motion_filter.min_score=0.5 (repeat for more).")
@click.option("--to", "to", type=click.Path(file_okay=False),
              help="Write the refiltered output (shards, rejects, manifest) to this new folder.")
def refilter_command(out: str, overrides: tuple[str, ...], to: str | None) -> None:
    """What-if: the samples OUT's recipe keeps with other filter thresholds, decided from the
    stored scores without decoding; OUT is left as it is."""
    try:
        result = refilter(out, list(overrides), to)
    except (RefilterError, OutputError, RecipeError) as exc:
        click.echo(f"bricks-dj: error: {exc}", err=True)
        sys.exit(2)
    click.echo(format_table(result.before, result.after))
    samples = result.manifest["samples"]
    click.echo(f"kept {samples['total']} samples ({samples['video']} clips, {samples['image']} images); "
               f"manifest: {result.written_to}")
    if to is not None:  # a whole output: its report, as a run writes one
        from .run import write_run_report

        result.manifest["report"] = write_run_report(to, result.manifest)
        write_manifest(to, result.manifest)
    report = result.manifest.get("report") or {}
    if report.get("written"):
        click.echo(f"report: {open_store(to or out).show(report['file'])}")


def format_table(before: dict[str, OpStats], after: dict[str, OpStats]) -> str:
    """Per step, in recipe order: samples in, out and dropped, before -> after."""
    labels = sorted(set(before) | set(after), key=lambda label: step_of(label) or 0)
    rows = [("step", "in", "out", "dropped", "failed")]
    for label in labels:
        a, b = before.get(label, OpStats()), after.get(label, OpStats())
        rows.append((label, *(f"{x} -> {y}" if x != y else str(x) for x, y in
                              ((a.n_in, b.n_in), (a.n_out, b.n_out), (a.dropped, b.dropped), (a.failed, b.failed)))))
    widths = [max(len(r[k]) for r in rows) for k in range(5)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)

