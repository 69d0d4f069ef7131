"""Finding pretrained folders: a local path, `$BRICKS_MODEL_DIR/<repo id>`, or the Hugging Face cache.

Nothing is downloaded here. A missing model is an error that names what was looked for,
where, and how to get it; it never turns into random weights.
"""

from __future__ import annotations

from pathlib import Path

from bricks.common.weights import MissingModelError, ModelFile, resolve

__all__ = ["MissingModelError", "locate", "looks_like_repo_id"]


def looks_like_repo_id(ref: str) -> bool:
    """"owner/name", not a relative or absolute path."""
    return ref.count("/") == 1 and not ref.startswith((".", "/", "~"))


def locate(ref: str | Path, what: str, expected: list[tuple[str, ...]]) -> Path:
    """The folder for `ref` (a path, or a Hugging Face repo id such as "stabilityai/sd-vae-ft-ema").

    `expected` lists file groups the folder needs, one name of each group (e.g. the
    safetensors or the .bin weights). A folder lacking one is an error naming the group.
    """
    ref = str(ref)
    path = Path(ref).expanduser()
    if path.exists() or not looks_like_repo_id(ref):
        if not path.exists():
            raise MissingModelError(f"{what}: {ref} does not exist")
        folder = path
    else:
        try:
            folder = resolve(ModelFile(repo_id=ref, filename=None))
        except MissingModelError as exc:
            need = ", ".join(" or ".join(group) for group in expected)
            raise MissingModelError(f"{what}: {exc}; the folder needs {need} "
                                    f"(on a machine with internet: `hf download {ref}`)") from None
    if folder.is_dir():
        lacking = [" or ".join(group) for group in expected if not any((folder / n).exists() for n in group)]
        if lacking:
            raise MissingModelError(f"{what}: {folder} lacks {'; '.join(lacking)}")
    return folder
