"""`bricks-dj`: run, validate and inspect data recipes; generate and process the demo corpus."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from . import registry
from .extras import MissingExtraError, check_plan
from .inputs import InputError
from .output import OutputError
from .recipe import RecipeError, load
from .refilter import refilter_command

from .model_stage import DeviceError
from bricks.common.weights import MissingModelError

from .operator import FatalModelError
from .ray_cluster import RayClusterError, stop_ray

USER_ERRORS = (RecipeError, InputError, OutputError, registry.RegistryError, MissingModelError, DeviceError,
               FatalModelError, MissingExtraError, RayClusterError)
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def _fail(exc: Exception) -> None:
    click.echo(f"bricks-dj: error: {exc}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bricks", prog_name="bricks-dj", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", is_flag=True, help="Log each step.")
def main(verbose: bool) -> None:
    """Turn raw videos into training shards with a YAML recipe of operators."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a recipe field, e.g. executor.mode=local or process.motion_filter.min_score=0.5.")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@click.option("--address", help="Join this Ray cluster instead of starting Ray here.")
@click.option("--local", "local", is_flag=True, help="Run in-process without Ray (debugging).")
@click.option("--overwrite", is_flag=True, help="Discard earlier output and start over.")
@click.option("--strict", is_flag=True, help="Exit with status 1 if any source or sample failed.")
def run(recipe: str, overrides: tuple[str, ...], address: str | None, local: bool, overwrite: bool, strict: bool,
        report_options=None) -> None:
    """Run RECIPE; rerunning resumes where an interrupted run stopped."""
    # `report_options` (a ReportOptions) is no command-line option: `demo` passes its own.
    from .progress import RunProgress, print_summary
    from .run import run as run_recipe

    if address and local:
        raise click.UsageError("--address joins a Ray cluster and --local runs without Ray: give one of them")
    if address:  # as JSON, a YAML string whatever the address looks like (`[::1]:6379`)
        overrides = [*overrides, "executor.mode=ray", f"executor.address={json.dumps(address)}"]
    try:
        loaded = load(recipe, overrides)
        display = RunProgress()
        try:
            manifest = run_recipe(loaded, overwrite=overwrite, mode="local" if local else None,
                                  on_start=display.start, on_source=display.source, frames=display.frames,
                                  report=report_options)
        finally:
            display.close()
            stop_ray()
    except USER_ERRORS as exc:
        _fail(exc)
    print_summary(manifest, loaded.model.output)
    _say_report(manifest, loaded.model.output, report_options)
    failed = manifest["rejects"]["failed"]  # failed sources are rows of the rejects table too
    if strict and failed:
        click.echo(f"bricks-dj: {failed} failures (see {loaded.model.output}/rejects)", err=True)
        sys.exit(1)


def _say_report(manifest: dict, out: str, options=None) -> None:
    report = manifest.get("report") or {}
    if report.get("written"):
        config = getattr(options, "train_config", None)
        buckets = f" (with the buckets of bricks-train --config {config})" if config else ""
        click.echo(f"report: {out.rstrip('/')}/{report['file']}{buckets}")
    # else: the run has already warned why


@main.command()
@click.argument("out")
@click.option("--train-config", help="A training config (a shipped name or a path): show how it buckets the samples.")
@click.option("--world-size", default=1, show_default=True, type=click.IntRange(min=1),
              help="GPUs the trainer would run on (steps per epoch, GPU-hours).")
@click.option("--samples-per-second", type=click.FloatRange(min=0, min_open=True),
              help="Measured training throughput of the whole job (as bricks-train logs it): GPU-hours per epoch.")
@click.option("--t5", help="T5 tokenizer for caption lengths: a folder, a repo id in the Hugging Face cache, "
                           "or `tiny` (default: the training config's, else DeepFloyd/t5-v1_1-xxl).")
def report(out: str, train_config: str | None, world_size: int, samples_per_second: float | None,
           t5: str | None) -> None:
    """Write OUT/report.html: the funnel, score histograms with thresholds, thumbnails, the kept
    samples' distributions and, with --train-config, the trainer's buckets. Self-contained: open
    it in a browser, offline."""
    from .report import ReportError, ReportOptions, write_report

    if samples_per_second is not None and not train_config:
        raise click.UsageError("--samples-per-second needs --train-config (GPU-hours come from its buckets)")
    try:
        path = write_report(out, ReportOptions(train_config, world_size, samples_per_second, t5))
    except ReportError as exc:
        _fail(exc)
    click.echo(f"report: {path}")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
def validate(recipe: str, overrides: tuple[str, ...]) -> None:
    """Check RECIPE without running it: everything `run` checks before it starts (operators and
    parameters, devices, weights and endpoints of model operators, inputs, the Ray cluster)."""
    from .run import preflight

    try:
        loaded = load(recipe, list(overrides))
        _, inputs = preflight(loaded)
    except USER_ERRORS as exc:
        _fail(exc)
    steps = ", ".join(op.name for op in loaded.ops)
    click.echo(f"{recipe}: ok ({len(inputs.uris)} sources; {steps})")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--no-dj", "no_dj", is_flag=True, help="Leave out Data-Juicer's operators (dj.*).")
def ops(as_json: bool, no_dj: bool) -> None:
    """List the available operators with their parameters: bricks' own and plug-ins, then the
    Data-Juicer operators a recipe can run as `dj.<name>` (with the `dj` extra)."""
    try:
        operators = registry.all_operators()
        if not no_dj:
            operators.update(registry.dj_operators())
    except registry.RegistryError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps({name: {"kind": registry.kind_of(cls), "description": cls.description,
                                      "params": cls.Params.model_json_schema().get("properties", {})}
                               for name, cls in operators.items()}, indent=2))
        return
    table = Table(show_lines=True)
    for column in ("operator", "kind", "description", "parameters (default)"):
        table.add_column(column)
    for name, cls in operators.items():
        params = "\n".join(f"{field}: {info.default!r}" for field, info in cls.Params.model_fields.items())
        table.add_row(name, registry.kind_of(cls), cls.description, params or "-")
    Console().print(table)


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("words", nargs=-1, required=True, metavar="[download] RECIPE")
@set_option
def models(words: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """List the model weights RECIPE needs and where they were found or looked for;
    `models download RECIPE` fetches the missing ones (needs internet)."""
    if len(words) == 2 and words[0] == "download":
        _download(words[1], overrides)
        return
    if len(words) != 1:
        raise click.UsageError("expected RECIPE or `download RECIPE`")
    found_all = True
    for step, spec, (state, where) in _model_files(words[0], overrides):
        found_all &= state == "found"
        click.echo(f"{step.op.name}: {spec.label}: {state}: {where}")
    if not found_all:
        sys.exit(1)


def _download(recipe: str, overrides) -> None:
    from bricks.common.weights import download

    for step, spec, (state, where) in _model_files(recipe, overrides):
        if state == "found":
            click.echo(f"{spec.label}: already at {where}")
            continue
        try:
            click.echo(f"{spec.label}: downloaded to {download(spec)}")
        except Exception as exc:
            _fail(RuntimeError(f"{spec.label}: download failed: {exc}"))


def _model_files(recipe: str, overrides):
    from bricks.common.weights import status
    from .plan import build

    try:
        plan = build(load(recipe, list(overrides)))
    except USER_ERRORS as exc:
        _fail(exc)
    for step in plan.model_steps:
        files = step.op.model_files()
        if step.op.tiny_preset:
            click.echo(f"{step.op.name}: tiny random-init preset, no weights needed")
        elif not files:
            click.echo(f"{step.op.name}: no local weights (served by an endpoint)")
        for spec in files:
            yield step, spec, status(spec)


# The demo runs the real recipe with every model swapped for its tiny random-init preset on
# CPU, and shot detection set for the synthetic shots (20-260 frames).
DEMO_OVERRIDES = (
    "process.resolution_filter.min_width=160", "process.resolution_filter.min_height=90",
    "process.shot_split.min_scene_len=15",
    "process.encode_clips.short_side=180",
    "process.aesthetic_filter.preset=tiny", "process.aesthetic_filter.device=cpu",
    "process.aesthetic_filter.min_score=0", "process.aesthetic_filter.batch_size=16",
    "process.vlm_caption.preset=tiny", "process.vlm_caption.backend=transformers",
    "process.vlm_caption.device=cpu", "process.vlm_caption.batch_size=8", "process.vlm_caption.max_new_tokens=24",
)


DEMO_TRAIN_CONFIG = "tiny-cpu"  # the CPU smoke run the README trains on demo/out


@main.command()
@click.argument("out")
@click.option("--format", "fmt", required=True, type=click.Choice(["opensora", "dj", "webdataset"]),
              help="opensora: Open-Sora 1.1's CSV; dj: Data-Juicer's JSONL; webdataset: tar shards.")
@click.option("--to", "to", required=True, type=click.Path(file_okay=False), help="The folder to write.")
@click.option("--name", help="File name of the CSV or JSONL (default: the output folder's name).")
@click.option("--samples-per-tar", default=1000, show_default=True, help="webdataset: samples per tar.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier export in the folder (only its own files).")
def export(out: str, fmt: str, to: str, name: str | None, samples_per_tar: int, overwrite: bool) -> None:
    """Write the kept samples of the output OUT as files another tool reads: every clip and image
    as a media file, listed in an Open-Sora CSV, a Data-Juicer JSONL or WebDataset tars."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from .export import ExportError, export as export_output

    with Progress("[bold]export", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("rows")
        try:
            summary = export_output(out, fmt, to, overwrite=overwrite, samples_per_tar=samples_per_tar, name=name,
                                    progress=lambda done, total: bar.update(task, completed=done, total=total))
        except (ExportError, OutputError) as exc:
            _fail(exc)
    listed = ", ".join(summary["files"][:3]) + (" ..." if len(summary["files"]) > 3 else "")
    click.echo(f"{summary['to']}: {summary['rows']} samples ({summary['video']} clips, {summary['image']} images; "
               f"{summary['cut_from_source']} cut from their sources) in {listed}")
    if summary["left_out_columns"]:
        click.echo(f"left out (binary columns): {', '.join(summary['left_out_columns'])}", err=True)


@main.command()
@click.option("--workdir", default="demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the corpus and the output go.")
@click.option("--num-videos", default=6, show_default=True, help="Synthetic videos to generate.")
@click.option("--recipe", "recipe_path", default=str(RECIPES_DIR / "brickfilm.yaml"), show_default=True,
              type=click.Path(dir_okay=False))
@click.option("--local", "local", is_flag=True, help="Run in-process without Ray.")
@set_option
def demo(workdir: str, num_videos: int, recipe_path: str, local: bool, overrides: tuple[str, ...]) -> None:
    """Generate synthetic brick-film videos and run the Text2Bricks recipe over them with tiny models."""
    from .plan import build
    from bricks.common.synthetic import generate_corpus

    videos = Path(workdir) / "videos"
    demo_overrides = (f"input={videos}", f"output={Path(workdir) / 'out'}", *DEMO_OVERRIDES, *overrides)
    try:  # a bad --set or a missing extra stops the demo before it generates anything
        loaded = load(recipe_path, list(demo_overrides))
        check_plan(build(loaded), loaded.source)
    except USER_ERRORS as exc:
        _fail(exc)
    if not (videos / "truth.json").exists():
        click.echo(f"generating {num_videos} synthetic brick-film videos in {videos}", err=True)
        generate_corpus(videos, num_videos=num_videos)
    # The report shows what the demo's trainer would get: the tiny CPU config's buckets and
    # caption lengths in its tokenizer's tokens.
    from .report import ReportOptions

    ctx = click.get_current_context()
    ctx.invoke(run, recipe=recipe_path, local=local, address=None, overwrite=True, strict=True,
               overrides=demo_overrides, report_options=ReportOptions(train_config=DEMO_TRAIN_CONFIG, t5="tiny"))


main.add_command(refilter_command)


if __name__ == "__main__":
    main()
