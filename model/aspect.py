"""Open-Sora 1.1's resolution grid: for each resolution name, a (height, width) per aspect ratio.

Aspect ratios are height / width, keyed as Open-Sora keys them ("0.56" is 9:16 landscape,
360 x 640 at 360p). The sizes are Open-Sora's published tables (`aspect_ratios.json`), not a
formula: several entries were adjusted by hand there, and the trainer's buckets must agree
with the sizes the released weights were trained at.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def resolutions() -> dict[str, dict]:
    """{name: {"pixels": int, "sizes": {ratio_key: (height, width)}}}."""
    raw = json.loads((Path(__file__).with_name("aspect_ratios.json")).read_text())
    return {name: {"pixels": entry["pixels"], "sizes": {k: tuple(v) for k, v in entry["sizes"].items()}}
            for name, entry in raw.items()}


def parse_ratio(value: str | float) -> float:
    """'16:9' (width:height, as people write it), '9/16' or 0.5625 (height / width) to height / width."""
    if isinstance(value, (int, float)):
        ratio = float(value)
    elif ":" in value:
        w, h = value.split(":", 1)
        ratio = float(h) / float(w)
    elif "/" in value:
        h, w = value.split("/", 1)
        ratio = float(h) / float(w)
    else:
        ratio = float(value)
    if ratio <= 0:
        raise ValueError(f"aspect ratio must be positive, got {value!r}")
    return ratio


def closest_ratio(ratio: float, resolution: str) -> str:
    """The key of `resolution`'s table nearest to height / width `ratio`."""
    return min(sizes(resolution), key=lambda key: abs(float(key) - ratio))


def sizes(resolution: str) -> dict[str, tuple[int, int]]:
    table = resolutions()
    if resolution not in table:
        raise ValueError(f"unknown resolution {resolution!r}; known: {', '.join(table)}")
    return table[resolution]["sizes"]


def frame_size(resolution: str, ratio: str | float) -> tuple[int, int]:
    """(height, width) for a resolution name and an aspect ratio, snapped to the nearest in its table."""
    return sizes(resolution)[closest_ratio(parse_ratio(ratio), resolution)]
