"""The output folder's data-set card, `OUT/README.md`, written at the end of each run.

Its Hugging Face front matter makes `datasets.load_dataset(OUT)` read the kept samples
(`shards/*.parquet`) as the train split, and leave `rejects/` out; its body lists the columns
and the run's counts from the manifest.

The card's first front-matter line marks it as bricks-dj's. Only a card with that line is
rewritten (and deleted by `--overwrite`): a README.md without it is the user's, and the run
leaves it as it is, with a warning and a note in the manifest (`dataset_card`). Deleting the
line keeps a card that has been edited by hand.
"""

from __future__ import annotations

import logging
from typing import Any

from .schema import BASE_COLUMNS
from .store import Store, store_errors

CARD = "README.md"
MARKER = "# written by bricks-dj, rewritten after each run: delete this line to keep your edits"
DATA_FILES = "shards/*.parquet"

log = logging.getLogger(__name__)

DESCRIPTIONS = {
    "sample_id": "stable id: the same source, recipe and range give the same id",
    "kind": "`video` (a clip) or `image` (a still)",
    "source_uri": "the source video: an absolute path or the URI as given",
    "start_frame": "first frame of the sample, in source frame indices",
    "end_frame": "frame after the last one (exclusive)",
    "start_time": "presentation time of `start_frame` in the source, seconds",
    "end_time": "end of the sample in the source, seconds",
    "num_frames": "frames in the sample (of `media` when it holds a clip)",
    "fps": "frame rate (null for images)",
    "height": "height as displayed (rotation applied), pixels",
    "width": "width as displayed, pixels",
    "aspect_ratio": "height / width",
    "resolution": "height * width",
    "text": "caption; null until captioned",
    "media": "the clip as MP4 or the image as JPEG; null for a clip in reference mode",
    "media_format": "`mp4`, `jpeg` or null",
    "path": "the source file to read a reference-mode clip's frames from",
}


def is_bricks_card(text: str) -> bool:
    return text.startswith(f"---\n{MARKER}\n")


def card_is_ours(store: Store) -> bool | None:
    """True when OUT/README.md is a card bricks-dj wrote, False when it is someone else's,
    None when there is none."""
    if not store.isfile(CARD):
        return None
    try:
        return is_bricks_card(store.read_text(CARD))
    except UnicodeDecodeError:
        return False


def write_card(store: Store, manifest: dict[str, Any], column_ops: dict[str, str] | None = None) -> dict[str, Any]:
    """Write OUT/README.md for the run `manifest` describes, unless a README.md that bricks-dj
    did not write is there. `column_ops` names the operator behind each extra column. Returns
    the manifest's `dataset_card` entry."""
    with store_errors(store):
        if card_is_ours(store) is False:
            reason = f"{store.show(CARD)} was not written by bricks-dj: left as it is, no data-set card written"
            log.warning(reason)
            return {"written": False, "reason": reason}
        store.write(CARD, card_text(manifest, column_ops or {}))
    return {"written": True, "file": CARD}


def card_text(manifest: dict[str, Any], column_ops: dict[str, str]) -> str:
    samples, sources, rejects = manifest["samples"], manifest["sources"], manifest["rejects"]
    shards = manifest["shards"]
    ops = [op["name"] for op in manifest["ops"]]
    version = manifest.get("versions", {}).get("bricks")
    made_by = f"bricks-dj {version}" if version else "bricks-dj"
    lines = [
        "---", MARKER, "configs:", "- config_name: default", "  data_files:", "  - split: train",
        f'    path: "{DATA_FILES}"', "---", "",
        "# Video-text samples made by bricks-dj", "",
        f"{samples['total']} samples ({samples['video']} video clips, {samples['image']} images) in "
        f"{len(shards)} Parquet shard{'' if len(shards) == 1 else 's'} under `shards/`, "
        f"from {sources['done']} of {sources['total']} sources "
        f"({sources['kept']} kept, {sources['dropped']} dropped, {sources['failed']} failed), made by "
        f"{made_by} on {manifest['finished_at']}.",
        "",
        f"Operators: {', '.join(f'`{name}`' for name in ops) or 'none'}. "
        + ("Clips are stored as MP4 in `media`." if "encode_clips" in ops else
           "Clips are in reference mode: `media` is null and the clip is frames `start_frame` to "
           "`end_frame` (exclusive) of the video at `path`."),
        "",
        f"Dropped and failed samples and sources ({rejects['dropped']} dropped, {rejects['failed']} failed) "
        "are in `rejects/`, with the operator and the reason; they are not part of the train split. "
        "`manifest.json` holds the recipe, the versions and the counts per operator.",
        "",
        "## Loading", "",
        "```python",
        "from datasets import load_dataset",
        'samples = load_dataset("path/to/this/folder")["train"]',
        "",
        "import pandas",
        'frame = pandas.read_parquet("path/to/this/folder/shards")',
        "```", "",
        "`bricks-dj export` writes the samples as Open-Sora's CSV, Data-Juicer's JSONL or WebDataset tars; "
        "`bricks-train --data` trains on the shards as they are.",
        "",
        "## Columns", "",
        "| column | type | description |", "| --- | --- | --- |",
    ]
    for name, dtype in manifest["columns"].items():
        what = DESCRIPTIONS.get(name) if name in BASE_COLUMNS else (
            f"written by `{column_ops[name]}`" if name in column_ops else "written by an operator")
        lines.append(f"| `{name}` | {dtype} | {what} |")
    return "\n".join(lines) + "\n"
