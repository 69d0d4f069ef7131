"""Where training metrics go: a JSON-lines file in the run directory (always), TensorBoard (by
default) and Weights & Biases (when asked). Only rank 0 writes.

`metrics.jsonl` has one line per logged step. On resume, lines past the checkpoint's step
(logged by the run that crashed after it) are cut, so the file reads as one run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .config import LoggingSection

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
        if settings.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if settings.wandb:
            import wandb

            self._wandb = wandb.init(project=settings.wandb_project, name=settings.wandb_run, config=config,
                                     dir=str(run_dir), resume="allow")

    def write(self, step: int, values: dict) -> None:
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tensorboard is not None:
            for key, value in numbers.items():
                self._tensorboard.add_scalar(f"train/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in numbers.items()}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


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
