"""Checkpoints in the run directory: everything needed to continue exactly, written atomically.

    RUN_DIR/checkpoints/step-00000500/
        model/   config.json + model.safetensors   (STDiT2.from_pretrained, bricks-sample --ckpt)
        ema/     config.json + model.safetensors   (the EMA weights, same format)
        optimizer.pt                               (full, by parameter name)
        state.json                                 (step, epoch, loader position, LR schedule, config)
        checksums.json                             (size and SHA-256 of each file above)

A checkpoint is assembled under a hidden temporary name and renamed into place when complete,
so a crash (kill -9 included) leaves either the whole checkpoint or none; the oldest are
deleted beyond `keep_last`, only after a newer one is in place. A write that fails (a full
disk) removes its partial copy and leaves the earlier checkpoints as they were.

What the rename cannot guard against (a file truncated or changed later: a copy cut short, a
disk error) `verify` finds from the checksums; checkpoints written before they were recorded
get structural checks instead (safetensors headers against file sizes, the optimizer's zip
CRCs, state.json parsing). `latest_sound` resumes from the newest checkpoint that passes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from bricks.common.files import mount_point
from bricks.model.stdit2 import STDiT2Config, load_state_dict

log = logging.getLogger("bricks")

PATTERN = re.compile(r"^step-(\d+)$")
CHECKSUMS = "checksums.json"
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file and what to do."""


@dataclass(frozen=True)
class Damage:
    file: str  # relative to the checkpoint folder
    reason: str

    def __str__(self) -> str:
        return f"{self.file} {self.reason}"


@dataclass
class Checkpoint:
    path: Path
    step: int

    @property
    def state(self) -> dict:
        try:
            return json.loads((self.path / "state.json").read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.path / 'state.json'}: cannot be read ({exc})") from None

    def model_state(self, which: str = "model") -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError

        path = self.path / which / "model.safetensors"
        try:
            return load_state_dict(path)
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"{path}: cannot be read ({exc})") from None

    def optimizer_state(self) -> dict:
        path = self.path / "optimizer.pt"
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, zipfile.BadZipFile, EOFError) as exc:
            raise CheckpointError(f"{path}: cannot be read ({str(exc).splitlines()[0]})") from None


def checkpoints(run_dir: Path) -> list[Checkpoint]:
    """The checkpoints of a run, oldest first (renamed into place whole; `verify` tells whether
    their files have stayed so)."""
    folder = Path(run_dir) / "checkpoints"
    found = []
    for entry in folder.iterdir() if folder.is_dir() else []:
        match = PATTERN.match(entry.name)
        if match and entry.is_dir():
            found.append(Checkpoint(entry, int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def latest(run_dir: Path) -> Checkpoint | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def latest_sound(run_dir: Path) -> Checkpoint | None:
    """The newest checkpoint that passes `verify` (None when the run has none). Damaged newer
    ones are logged with the reason and skipped; when every one is damaged, a CheckpointError
    names the newest one's damaged file."""
    found = checkpoints(run_dir)
    damaged: list[tuple[Checkpoint, Damage]] = []
    for candidate in reversed(found):
        damage = verify(candidate)
        if damage is None:
            return candidate
        damaged.append((candidate, damage))
        if len(damaged) < len(found):
            log.warning("skipping the damaged checkpoint %s: %s", candidate.path.name, damage)
    if not found:
        return None
    newest, damage = damaged[0]
    others = (f", and the {len(found) - 1} older checkpoint{'s are' if len(found) > 2 else ' is'} damaged too"
              if len(found) > 1 else "")
    raise CheckpointError(f"cannot resume: {newest.path / damage.file} {damage.reason}{others}; restore it from a copy, "
                          f"or move the damaged checkpoints out of {newest.path.parent} to start the run afresh")


def verify(ckpt: Checkpoint) -> Damage | None:
    """The first damaged file of a checkpoint, or None when every file is whole."""
    try:
        recorded = json.loads((ckpt.path / CHECKSUMS).read_text())["files"]
    except FileNotFoundError:
        return _structural_damage(ckpt.path)
    except (OSError, ValueError, KeyError, TypeError):
        return Damage(CHECKSUMS, "is damaged (not the JSON that was written)")
    if not isinstance(recorded, dict) or "state.json" not in recorded or not all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
            for e in recorded.values()):
        return Damage(CHECKSUMS, "is damaged (not the list of files that was written)")
    for name, entry in recorded.items():
        path = ckpt.path / name
        if not path.is_file():
            return Damage(name, "is missing")
        size = path.stat().st_size
        if size != entry["size"]:
            what = "is truncated" if size < entry["size"] else "has grown"
            return Damage(name, f"{what} ({size} bytes, {entry['size']} were written)")
        if _sha256(path) != entry["sha256"]:
            return Damage(name, "does not match the SHA-256 recorded when it was written")
    return None


def _structural_damage(folder: Path) -> Damage | None:
    """Checks for checkpoints without checksums: every file parses and is as long as it says."""
    from safetensors import SafetensorError, safe_open

    try:
        state = json.loads((folder / "state.json").read_text())
        if not isinstance(state, dict) or "step" not in state or "loader" not in state:
            return Damage("state.json", "lacks the step or the loader position")
    except FileNotFoundError:
        return Damage("state.json", "is missing")
    except (OSError, ValueError) as exc:
        return Damage("state.json", f"is not valid JSON ({exc})")
    for which in ("model", "ema"):
        if which == "ema" and not (folder / "ema").is_dir():
            continue
        try:
            json.loads((folder / which / "config.json").read_text())
        except (OSError, ValueError) as exc:
            return Damage(f"{which}/config.json", f"cannot be read ({exc})")
        try:
            with safe_open(str(folder / which / "model.safetensors"), "pt"):
                pass  # opening checks the header and that the data cover the whole file
        except (OSError, SafetensorError) as exc:
            return Damage(f"{which}/model.safetensors", f"is damaged ({exc})")
    try:
        with zipfile.ZipFile(folder / "optimizer.pt") as archive:
            bad = archive.testzip()
        if bad is not None:
            return Damage("optimizer.pt", f"fails its CRC check at {bad}")
    except (OSError, zipfile.BadZipFile) as exc:
        return Damage("optimizer.pt", f"is damaged ({exc})")
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def save(run_dir: Path, step: int, *, config: STDiT2Config, model: dict[str, torch.Tensor],
         ema: dict[str, torch.Tensor] | None, optimizer: dict, state: dict, keep_last: int) -> Path:
    """Write one checkpoint (call on one rank, with full state dicts) and prune old ones. A
    failed write (a full disk, say) is a CheckpointError; the earlier checkpoints stay intact."""
    from safetensors import SafetensorError

    folder = Path(run_dir) / "checkpoints"
    final = folder / f"step-{step:08d}"
    tmp = folder / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(tmp, step, config=config, model=model, ema=ema, optimizer=optimizer, state=state)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the earlier checkpoints are untouched
        raise CheckpointError(_write_failure(folder, final.name, exc)) from None
    if final.exists():  # the same step again (a rerun after a crash right after renaming)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old.path, ignore_errors=True)
    return final


def _write(tmp: Path, step: int, *, config: STDiT2Config, model: dict, ema: dict | None, optimizer: dict,
           state: dict) -> None:
    from safetensors.torch import save_file

    for name, weights in (("model", model), ("ema", ema)):
        if weights is None:
            continue
        (tmp / name).mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / name / "model.safetensors"))
        (tmp / name / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    with open(tmp / "optimizer.pt", "wb") as f:  # a file object: a write error is an OSError with its errno
        torch.save(optimizer, f)
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    recorded = {p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (tmp / CHECKSUMS).write_text(json.dumps({"files": recorded}, indent=2))
    _fsync_tree(tmp)


def _write_failure(folder: Path, name: str, exc: Exception) -> str:
    if _is_disk_full(exc):
        return (f"no space left on device {mount_point(folder)} (checkpoint {name} in {folder} was not written; "
                "the earlier checkpoints are intact): free space and rerun with --resume")
    return f"checkpoint {name} in {folder} could not be written ({str(exc).splitlines()[0]}): rerun with --resume"


def _is_disk_full(exc: Exception) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    # safetensors (Rust) reports the OS error in its message only
    return re.search(rf"os error ({errno.ENOSPC}|{errno.EDQUOT})\b", str(exc)) is not None


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
