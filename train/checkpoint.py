"""Checkpoints in the run directory: everything needed to continue exactly, written atomically.

    RUN_DIR/checkpoints/step-00000500/
        model/   config.json + model.safetensors   (STDiT2.from_pretrained, bricks-sample --ckpt)
        ema/     config.json + model.safetensors   (the EMA weights, same format)
        optimizer.pt                               (full, by parameter name)
        state.json                                 (step, epoch, loader position, LR schedule, config)

A checkpoint is assembled under a hidden temporary name and renamed into place when complete,
so a crash (kill -9 included) leaves either the whole checkpoint or none; the oldest are
deleted beyond `keep_last`, only after a newer one is in place.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from bricks.model.stdit2 import STDiT2Config, load_state_dict

log = logging.getLogger("bricks")

PATTERN = re.compile(r"^step-(\d+)$")


@dataclass
class Checkpoint:
    path: Path
    step: int

    @property
    def state(self) -> dict:
        return json.loads((self.path / "state.json").read_text())

    def model_state(self, which: str = "model") -> dict[str, torch.Tensor]:
        return load_state_dict(self.path / which / "model.safetensors")

    def optimizer_state(self) -> dict:
        return torch.load(self.path / "optimizer.pt", map_location="cpu", weights_only=True)


def checkpoints(run_dir: Path) -> list[Checkpoint]:
    """The complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    found = []
    for entry in folder.iterdir() if folder.is_dir() else []:
        match = PATTERN.match(entry.name)
        if match and (entry / "state.json").is_file():
            found.append(Checkpoint(entry, int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def latest(run_dir: Path) -> Checkpoint | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def save(run_dir: Path, step: int, *, config: STDiT2Config, model: dict[str, torch.Tensor],
         ema: dict[str, torch.Tensor] | None, optimizer: dict, state: dict, keep_last: int) -> Path:
    """Write one checkpoint (call on one rank, with full state dicts) and prune old ones."""
    from safetensors.torch import save_file

    folder = Path(run_dir) / "checkpoints"
    final = folder / f"step-{step:08d}"
    tmp = folder / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for name, weights in (("model", model), ("ema", ema)):
        if weights is None:
            continue
        (tmp / name).mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / name / "model.safetensors"))
        (tmp / name / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    torch.save(optimizer, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    _fsync_tree(tmp)
    if final.exists():  # the same step again (a rerun after a crash right after renaming)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old.path, ignore_errors=True)
    return final


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def remove_partial(run_dir: Path) -> None:
    """Delete half-written checkpoints that a killed run left behind."""
    for tmp in (Path(run_dir) / "checkpoints").glob(".step-*.tmp"):
        log.info("removing the incomplete checkpoint %s", tmp.name)
        shutil.rmtree(tmp, ignore_errors=True)
