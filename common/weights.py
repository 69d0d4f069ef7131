"""Where model weights come from: a local path, `BRICKS_MODEL_DIR`, or the Hugging Face cache.

Nothing is downloaded while a recipe runs. `bricks-dj models RECIPE` lists what a recipe needs
and where each file was looked for; `bricks-dj models download RECIPE` fetches them on a
machine with internet. A real run never falls back to random weights: tiny random-init
presets exist for tests and the demo, are chosen explicitly, and say so when used.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("bricks")

MODEL_DIR_ENV = "BRICKS_MODEL_DIR"


class MissingModelError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelFile:
    """One weights file (or, with `filename=None`, a whole repository snapshot)."""

    repo_id: str  # Hugging Face repository
    filename: str | None
    local_path: str | None = None  # given in the recipe: used as is

    @property
    def label(self) -> str:
        return f"{self.repo_id}/{self.filename}" if self.filename else self.repo_id

    def candidates(self) -> list[Path]:
        """Places looked at, in order, before the Hugging Face cache."""
        found = []
        if self.local_path:
            found.append(Path(self.local_path).expanduser())
        root = os.environ.get(MODEL_DIR_ENV)
        if root:
            base = Path(root).expanduser() / self.repo_id
            found.append(base / self.filename if self.filename else base)
        return found


def resolve(spec: ModelFile) -> Path:
    """The local path of `spec`, or `MissingModelError` saying where it looked and what to do."""
    for path in spec.candidates():
        if path.exists():
            return path
    if spec.local_path:
        raise MissingModelError(f"{spec.label}: {spec.local_path} does not exist")
    cached = _from_hf_cache(spec)
    if cached is not None:
        return cached
    looked = [str(p) for p in spec.candidates()] + ["the Hugging Face cache (HF_HOME)"]
    raise MissingModelError(
        f"model weights {spec.label} not found (looked in: {', '.join(looked)}); "
        f"run `bricks-dj models download RECIPE` on a machine with internet, or put the file under "
        f"${MODEL_DIR_ENV}/{spec.repo_id}/"
    )


def _from_hf_cache(spec: ModelFile) -> Path | None:
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        if spec.filename:
            return Path(hf_hub_download(spec.repo_id, spec.filename, local_files_only=True))
        return Path(snapshot_download(spec.repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def status(spec: ModelFile) -> tuple[str, str]:
    """('found', path) or ('missing', where it looked)."""
    try:
        return "found", str(resolve(spec))
    except MissingModelError as exc:
        return "missing", str(exc)


def download(spec: ModelFile) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    if spec.filename:
        return Path(hf_hub_download(spec.repo_id, spec.filename))
    return Path(snapshot_download(spec.repo_id))


def warn_tiny(name: str) -> None:
    log.warning("%s: using the tiny random-init preset (tests and demo only): its outputs mean nothing", name)
