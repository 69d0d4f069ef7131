"""`bricks-train`: fine-tune STDiT2 on `bricks-dj` shards, from one CPU to many GPU nodes.

    bricks-train --config text2bricks-360p-32f --data out/brickfilm --output runs/t2b-32f
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HEAD:29500 \\
        -m bricks.train.cli --config text2bricks-360p-32f --data /shared/shards --output /shared/runs/t2b
    bricks-train --config text2bricks-360p-32f --data /shared/shards --output /shared/runs/t2b \\
        --ray-address auto --ray-workers 32
"""

from __future__ import annotations

import errno
import logging
import sys
from pathlib import Path

import click

from bricks.common.weights import MissingModelError

from .buckets import BucketConfigError
from .config import TrainConfigError, load_config, resolve_config_path, shipped_configs
from .loader import LoaderStateError
from .shards import ShardError

log = logging.getLogger("bricks")

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def user_errors() -> tuple[type[Exception], ...]:
    """What a bad config, bad data or a bad run directory raises: one line, exit status 2 (the
    Ray launcher raises a worker's error of these kinds on its driver as it is)."""
    from .checkpoint import CheckpointError
    from .trainer import TrainError

    return (TrainConfigError, BucketConfigError, ShardError, LoaderStateError, MissingModelError, TrainError,
            CheckpointError, FileNotFoundError)


def _list_configs(ctx: click.Context, _param, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        for name in shipped_configs():
            click.echo(f"{name}\t{resolve_config_path(name)}")
        ctx.exit()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bricks", prog_name="bricks-train", message="%(prog)s %(version)s")
@click.option("--list-configs", is_flag=True, expose_value=False, is_eager=True, callback=_list_configs,
              help="List the shipped configs (names for --config) and exit.")
@click.option("--config", "config_ref", required=True,
              help="A YAML config, or a shipped one by name (bricks-train configs).")
@click.option("--data", "data", required=True, multiple=True,
              help="Shards: a bricks-dj output, a folder, a glob or an fsspec URI (repeatable).")
@click.option("--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run directory: checkpoints, metrics.jsonl, train.log, tensorboard/, samples/.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config field, e.g. --set optim.lr=1e-5 (repeatable).")
@click.option("--ckpt", help="Starting STDiT2 weights (folder, .safetensors, or a cached repo id), over model.ckpt.")
@click.option("--resume", is_flag=True, help="Continue from the run directory's latest checkpoint.")
@click.option("--max-steps", type=click.IntRange(min=1),
              help="Stop after this many steps in all (over train.max_steps).")
@click.option("--allow-data-change", is_flag=True,
              help="On --resume with other shards (or ranks, workers), start the next epoch instead of refusing.")
@click.option("--device", help="Override the device (default: this rank's GPU, else CPU).")
@click.option("--ray-address", metavar="ADDRESS",
              help="Train on a Ray cluster through Ray Train: HOST:PORT or ray://HOST:PORT of its head, auto "
                   "(the cluster this machine is a node of), or local (Ray started here). Needs --ray-workers.")
@click.option("--ray-workers", type=click.IntRange(min=1), metavar="N",
              help="Ray Train workers (the world size), with --ray-address.")
@click.option("--ray-gpus-per-worker", type=click.IntRange(0, 1), metavar="0|1",
              help="1: a GPU for each worker, NCCL; 0: CPU workers, gloo (default: 1 if the cluster has GPUs).")
@click.option("--ray-cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              metavar="CPUS", help="CPUs Ray reserves for each worker (Ray sets OMP_NUM_THREADS to match).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(config_ref, data, output, overrides, ckpt, resume, max_steps, allow_data_change, device, ray_address,
         ray_workers, ray_gpus_per_worker, ray_cpus_per_worker, verbose) -> None:
    """Fine-tune STDiT2 on Parquet shards written by bricks-dj."""
    from .trainer import RunOptions, train

    on_ray = _ray_launch(ray_address, ray_workers, ray_gpus_per_worker, ray_cpus_per_worker)
    setup_logging(verbose)
    errors = user_errors()
    if on_ray is not None:
        from .ray_launch import RayLaunchError

        errors += (RayLaunchError,)
    try:
        config = load_config(config_ref, list(overrides))
        options = RunOptions(data=list(data), output=output, ckpt=ckpt, resume=resume, max_steps=max_steps,
                             allow_data_change=allow_data_change, device=device)
        if on_ray is None:
            summary = train(config, options)
        else:
            from .ray_launch import launch

            summary = launch(config, options, on_ray, verbose)
    except errors as exc:
        click.echo(f"bricks-train: error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in NO_SPACE:
            raise
        # the metrics, the log or a sample: the checkpoints are written (and cleaned up) on their own
        click.echo(f"bricks-train: error: no space left on device writing {exc.filename or output}: free space "
                   "and rerun with --resume", err=True)
        sys.exit(2)
    if summary["stopped"]:
        log.warning("stopped by SIGTERM at step %d, checkpoint saved: rerun with --resume to continue", summary["step"])
        sys.exit(128 + 15)
    log.info("done: %d steps, %d samples skipped", summary["step"], summary["skipped"])


def _ray_launch(address, workers, gpus_per_worker, cpus_per_worker):
    """The Ray Train launch the options ask for (None: this process trains, alone or as a
    torchrun rank)."""
    if address is None:
        for name, value in (("--ray-workers", workers), ("--ray-gpus-per-worker", gpus_per_worker)):
            if value is not None:
                raise click.UsageError(f"{name} needs --ray-address (the Ray cluster to train on)")
        return None
    if workers is None:
        raise click.UsageError("--ray-address needs --ray-workers N (how many Ray Train workers)")
    from .ray_launch import RayLaunch

    return RayLaunch(address, workers, gpus_per_worker, cpus_per_worker)


def setup_logging(verbose: bool, own_handler: bool = False) -> None:
    """bricks' log lines on stderr, each with its rank in a world of several. `own_handler`
    gives the "bricks" logger a handler of its own, for processes (Ray workers) whose root
    logger is someone else's."""
    import os

    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    level = logging.DEBUG if verbose else logging.INFO
    fmt = f"%(asctime)s {prefix}%(levelname)s %(message)s"
    if not own_handler:
        logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    bricks_log = logging.getLogger("bricks")
    bricks_log.addHandler(handler)
    bricks_log.setLevel(level)
    bricks_log.propagate = False


if __name__ == "__main__":
    main()
