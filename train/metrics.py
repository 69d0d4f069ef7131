"""Where training metrics go: a JSON-lines file in the run directory (always), TensorBoard (by
default) and Weights & Biases (when asked). Only rank 0 writes.

`metrics.jsonl` has one line per logged step. On resume, lines past the checkpoint's step
(logged by the run that crashed after it) are cut, so the file reads as one run.

Besides the scalars, both backends get the fixed-seed sample videos (TensorBoard as animated
GIFs, W&B as the MP4 files of `samples/step-N/`) and the window's throughput per bucket. A
TensorBoard or W&B call that fails is one warning, and that backend gets nothing more of that
kind in this run: training goes on, with metrics.jsonl and samples/ complete. A failure to
write metrics.jsonl itself stops the run (it is the record a resumed run continues).
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Callable

from .config import LoggingSection, TrainConfigError

log = logging.getLogger("bricks")


class MetricsLog:
    def __init__(self, run_dir: Path, settings: LoggingSection, config: dict, resume_step: int | None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None:
            truncate_after(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a")
        self._tensorboard = self._wandb = None
        self._off: set[tuple[str, str]] = set()  # (backend, kind) that failed once: not tried again
        if settings.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if settings.wandb:
            try:
                import wandb
            except ImportError:
                raise TrainConfigError("logging.wandb is true but the wandb package is not installed: "
                                       "pip install 'bricks[wandb]', or set logging.wandb=false") from None

            self._wandb = wandb.init(project=settings.wandb_project, name=settings.wandb_run, config=config,
                                     dir=str(run_dir), resume="allow")

    def write(self, step: int, values: dict) -> None:
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        scalars = {f"train/{k}": v for k, v in values.items() if _is_number(v)}
        for bucket, rates in (values.get("throughput") or {}).items():
            for name in ("samples_per_s", "steps_per_s"):
                scalars[f"throughput/{bucket}/{name}"] = rates[name]
        if self._tensorboard is not None:
            def tensorboard():
                for key, value in scalars.items():
                    self._tensorboard.add_scalar(key, value, step)

            self._guard("TensorBoard", "scalars", step, tensorboard)
        if self._wandb is not None:
            self._guard("W&B", "scalars", step, lambda: self._wandb.log(scalars, step=step))

    def samples(self, step: int, prompts: list[str], videos, fps: float, paths: list[Path]) -> None:
        """The sample videos of `step` ([N, 3, T, H, W] in [-1, 1], one per prompt, written to
        `paths` already): TensorBoard `samples/<index>` (a GIF at `fps`, a PNG for one frame) with
        the prompt as text `samples/<index>/prompt`; W&B `samples/<index>`, the file with the
        prompt as caption."""
        from bricks.model.sampling import to_uint8_frames

        if self._tensorboard is not None:
            def tensorboard():
                for index, (video, prompt) in enumerate(zip(videos, prompts)):
                    self._tensorboard.file_writer.add_summary(
                        image_summary(f"samples/{index}", to_uint8_frames(video), fps), step)
                    self._tensorboard.add_text(f"samples/{index}/prompt", prompt, step)
                self._tensorboard.flush()

            self._guard("TensorBoard", "samples", step, tensorboard)
        if self._wandb is not None:
            def wandb_samples():
                import wandb

                media = {f"samples/{index}": (wandb.Image if path.suffix == ".png" else wandb.Video)(
                    str(path), caption=prompt) for index, (path, prompt) in enumerate(zip(paths, prompts))}
                self._wandb.log(media, step=step)

            self._guard("W&B", "samples", step, wandb_samples)

    def _guard(self, backend: str, kind: str, step: int | None, call: Callable[[], None]) -> None:
        """A backend's failure is not the run's: say so once, and stop sending it that kind."""
        if (backend, kind) in self._off:
            return
        try:
            call()
        except Exception as exc:  # any backend error: the run and metrics.jsonl carry on
            self._off.add((backend, kind))
            if step is None:
                log.warning("%s: closing failed (%s: %s); its last entries may be missing (metrics.jsonl has "
                            "them)", backend, type(exc).__name__, exc)
            else:
                log.warning("%s: logging %s at step %d failed (%s: %s); %s gets no more %s in this run "
                            "(metrics.jsonl and samples/ have them)", backend, kind, step, type(exc).__name__,
                            exc, backend, kind)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._guard("TensorBoard", "close", None, self._tensorboard.close)
        if self._wandb is not None:
            import wandb

            # finish() can return before wandb's service has written the run's records (an offline
            # run's .wandb file was seen holding its header only); teardown waits for them, rather
            # than leaving it to an atexit hook that Ray workers do not always run.
            self._guard("W&B", "close", None, lambda: (self._wandb.finish(), wandb.teardown()))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def image_summary(tag: str, frames: list, fps: float):
    """A TensorBoard image summary of uint8 [H, W, 3] frames: an animated GIF (what
    `SummaryWriter.add_video` writes, encoded here with Pillow, since add_video's moviepy 1.x
    path writes GIFs without frame delays or with a broken palette next to current imageio and
    Pillow), or a PNG for a single frame. GIF delays are in 1/100 s."""
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    images = [Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    if len(images) == 1:
        images[0].save(buffer, format="PNG")
    else:
        images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], loop=0,
                       duration=round(1000 / fps))
    height, width = frames[0].shape[:2]
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=buffer.getvalue())
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def bucket_throughput(window: list[dict]) -> dict[str, dict]:
    """Per bucket of a logging window's steps: steps, samples, seconds and their rates.

    Each step is counted in the bucket of rank 0's batch with rank 0's samples (ranks may train
    different buckets in one step, which takes as long as the slowest): with several ranks
    these are one rank's figures, while the window's `samples_per_s` counts all ranks."""
    totals: dict[str, dict] = {}
    for step in window:
        bucket = totals.setdefault(step["bucket"], {"steps": 0, "samples": 0, "seconds": 0.0})
        bucket["steps"] += 1
        bucket["samples"] += step["rank_samples"]
        bucket["seconds"] += step["step_time"]
    for bucket in totals.values():
        seconds = bucket["seconds"]
        bucket["samples_per_s"] = bucket["samples"] / seconds if seconds else 0.0
        bucket["steps_per_s"] = bucket["steps"] / seconds if seconds else 0.0
    return dict(sorted(totals.items()))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut short by a crash
            continue
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
