"""`bricks-sample`: prompts in, videos out, from an STDiT2 checkpoint (or the tiny demo models)."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path

import click
from click.core import ParameterSource

from bricks.common.weights import MissingModelError

from .stdit2 import STDiT2Config

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def read_prompts(prompts: tuple[str, ...], prompts_file: Path | None) -> list[str]:
    found = list(prompts)
    if prompts_file is not None:
        found += [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
    if not found:
        raise click.UsageError("give prompts as arguments or with --prompts-file")
    return found


def frame_size(resolution: str, aspect_ratio: str, size: str | None) -> tuple[int, int]:
    from .aspect import frame_size as table_size

    if size:
        try:
            height, width = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise click.BadParameter(f"{size!r} is not HEIGHTxWIDTH", param_hint="--size") from None
        return height, width
    try:
        return table_size(resolution, aspect_ratio)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--resolution/--aspect-ratio") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bricks", prog_name="bricks-sample", message="%(prog)s %(version)s")
@click.argument("prompts", nargs=-1)
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="One prompt per line (blank lines skipped).")
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=Path("samples"),
              show_default=True, help="Folder for the videos.")
@click.option("--ckpt", default="hpcai-tech/OpenSora-STDiT-v2-stage3", show_default=True,
              help="STDiT2 weights: a folder (config.json + model.safetensors), a .safetensors/.pt file "
                   "with --model-config, or a repo id in the Hugging Face cache.")
@click.option("--model-config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="config.json for a bare state-dict --ckpt.")
@click.option("--vae", default="stabilityai/sd-vae-ft-ema", show_default=True, help="VAE folder or repo id.")
@click.option("--text-encoder", default="DeepFloyd/t5-v1_1-xxl", show_default=True,
              help="T5 folder or repo id.")
@click.option("--model-max-length", default=200, show_default=True, help="Caption tokens (T5 padding length).")
@click.option("--tiny", is_flag=True,
              help="Tiny random-init models (demo and tests): the videos are noise. With --ckpt (a tiny "
                   "bricks-train run's RUN/checkpoints/step-N/ema), that STDiT2 with the tiny encoders it was "
                   "trained with.")
@click.option("--resolution", default="240p", show_default=True, help="144p, 240p, 360p, 480p, 720p, ...")
@click.option("--aspect-ratio", default="16:9", show_default=True,
              help="width:height (16:9, 9:16, 1:1), snapped to the resolution's table.")
@click.option("--size", help="HEIGHTxWIDTH in pixels, instead of --resolution/--aspect-ratio.")
@click.option("--num-frames", default=16, show_default=True, help="1 writes a still image (PNG).")
@click.option("--fps", default=24.0, show_default=True, help="Frame rate the model is conditioned on.")
@click.option("--frame-interval", default=3, show_default=True,
              help="The video is written at fps / frame-interval.")
@click.option("--steps", default=100, show_default=True, help="Sampling steps (respaced from 1000).")
@click.option("--cfg-scale", default=7.0, show_default=True, help="Classifier-free guidance scale.")
@click.option("--seed", default=42, show_default=True)
@click.option("--batch-size", default=1, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto", show_default=True,
              help="auto: bf16 on GPU, fp32 on CPU.")
def main(prompts, prompts_file, output, ckpt, model_config, vae, text_encoder, model_max_length, tiny,
         resolution, aspect_ratio, size, num_frames, fps, frame_interval, steps, cfg_scale, seed, batch_size,
         device, dtype):
    """Generate videos from text prompts with STDiT2 (Open-Sora 1.1), VAE and T5."""
    import json

    import torch
    from safetensors import SafetensorError

    from .sampling import SampleSpec, VideoSampler

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    texts = read_prompts(prompts, prompts_file)
    height, width = frame_size(resolution, aspect_ratio, size)
    try:
        spec = SampleSpec(num_frames=num_frames, height=height, width=width, fps=fps, frame_interval=frame_interval,
                          steps=steps, cfg_scale=cfg_scale, seed=seed, batch_size=batch_size)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda: no CUDA device is visible")
    torch_dtype = None if dtype == "auto" else getattr(torch, DTYPES[dtype])
    ckpt_given = click.get_current_context().get_parameter_source("ckpt") != ParameterSource.DEFAULT
    try:
        if tiny:
            sampler = VideoSampler.tiny(device=device, ckpt=ckpt if ckpt_given else None)
        else:
            config = STDiT2Config.from_dict(json.loads(model_config.read_text())) if model_config else None
            sampler = VideoSampler.from_pretrained(ckpt, vae, text_encoder, model_max_length, device=device,
                                                   dtype=torch_dtype, config=config)
    except (MissingModelError, FileNotFoundError, KeyError, ValueError) as exc:
        click.echo(f"bricks-sample: {exc}", err=True)
        sys.exit(2)
    except SafetensorError as exc:  # its message does not name the file
        click.echo(f"bricks-sample: {ckpt}: the weights cannot be read ({exc})", err=True)
        sys.exit(2)
    if tiny and torch_dtype is not None:
        sampler.model.to(torch_dtype)
        sampler.vae.to(torch_dtype)

    click.echo(f"{len(texts)} prompt(s): {spec.num_frames} frames at {height}x{width}, {spec.steps} steps, "
               f"cfg {spec.cfg_scale}, seed {spec.seed}, on {device}", err=True)
    with progress_reporter() as report:
        videos = sampler.generate(texts, spec, callback=report)
    for path in sampler.save(videos, texts, output, spec):
        click.echo(str(path))


@contextmanager
def progress_reporter():
    """A callback(done, total): a live bar on a terminal, a line per tenth otherwise."""
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("sampling"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=Console(stderr=True)) as progress:
            task = progress.add_task("steps", total=None)
            yield lambda done, total: progress.update(task, completed=done, total=total)
        return

    def report(done: int, total: int) -> None:
        if done == total or done % max(total // 10, 1) == 0:
            click.echo(f"sampling: step {done}/{total}", err=True)

    yield report


if __name__ == "__main__":
    main()
