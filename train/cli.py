"""`bricks-train`: fine-tune STDiT2 on `bricks-dj` shards, from one CPU to many GPU nodes.

    bricks-train --config text2bricks-360p-32f --data out/brickfilm --output runs/t2b-32f
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HEAD:29500 \\
        -m bricks.train.cli --config text2bricks-360p-32f --data /shared/shards --output /shared/runs/t2b
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
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(config_ref, data, output, overrides, ckpt, resume, max_steps, allow_data_change, device, verbose) -> None:
    """Fine-tune STDiT2 on Parquet shards written by bricks-dj."""
    from .checkpoint import CheckpointError
    from .trainer import RunOptions, TrainError, train

    _setup_logging(verbose)
    try:
        config = load_config(config_ref, list(overrides))
        options = RunOptions(data=list(data), output=output, ckpt=ckpt, resume=resume, max_steps=max_steps,
                             allow_data_change=allow_data_change, device=device)
        summary = train(config, options)
    except (TrainConfigError, BucketConfigError, ShardError, LoaderStateError, MissingModelError, TrainError,
            CheckpointError, FileNotFoundError) as exc:
        click.echo(f"bricks-train: error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # the metrics, the log or a sample: the checkpoints are written (and cleaned up) on their own
        click.echo(f"bricks-train: error: no space left on device writing {exc.filename or output}: free space "
                   "and rerun with --resume", err=True)
        sys.exit(2)
    if summary["stopped"]:
        log.warning("stopped by SIGTERM at step %d, checkpoint saved: rerun with --resume to continue", summary["step"])
        sys.exit(128 + 15)
    log.info("done: %d steps, %d samples skipped", summary["step"], summary["skipped"])


def _setup_logging(verbose: bool) -> None:
    import os

    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format=f"%(asctime)s {prefix}%(levelname)s %(message)s", stream=sys.stderr)


if __name__ == "__main__":
    main()
