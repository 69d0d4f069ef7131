"""Read an exported Open-Sora CSV with Open-Sora 1.1's own data-set classes and check each row
against the shard row it came from.

    python opensora_reader.py DATA.csv EXPECTED.json

Run by tests/test_export.py in the interpreter of an environment with Open-Sora v1.1.0's
requirements (its torch and torchvision differ from bricks'), with the checkout on PYTHONPATH.
EXPECTED.json maps each media file's stem (the sample_id) to the row's kind, num_frames,
height, width, fps and text. Exits 1 with the first mismatch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from opensora.datasets import IMG_FPS, VariableVideoTextDataset, VideoTextDataset
from opensora.datasets.utils import read_video_from_path


def check(csv_path: str, expected: dict[str, dict]) -> int:
    variable = VariableVideoTextDataset(csv_path, frame_interval=1, transform_name="resize_crop")
    assert len(variable) == len(expected), f"{len(variable)} rows read, {len(expected)} expected"
    for index in range(len(variable)):
        path = variable.data.iloc[index]["path"]
        row = expected[Path(path).stem]
        shape = tuple(int(v) for v in variable.get_data_info(index))
        assert shape == (row["num_frames"], row["height"], row["width"]), f"{path}: {shape} in the CSV, {row}"
        # getitem, not [index]: Open-Sora's __getitem__ answers a failing sample with another one.
        item = variable.getitem("{}-{}-{}-{}".format(index, *shape))
        frames = 1 if row["kind"] == "image" else row["num_frames"]
        got = tuple(item["video"].shape)
        assert got == (3, frames, row["height"], row["width"]), f"{path}: loaded as {got}, {row}"
        assert item["text"] == row["text"], f"{path}: text {item['text']!r}, {row}"
        fps = IMG_FPS if row["kind"] == "image" else row["fps"]
        assert item["fps"] == fps, f"{path}: fps {item['fps']}, expected {fps}"
        if row["kind"] == "video":  # the whole file as Open-Sora decodes it: exactly the clip's frames
            whole = tuple(read_video_from_path(path, transform=lambda video: video).shape)
            assert whole == (3, row["num_frames"], row["height"], row["width"]), f"{path}: decodes as {whole}"
    shortest = min(r["num_frames"] for r in expected.values() if r["kind"] == "video")
    fixed = VideoTextDataset(csv_path, num_frames=shortest, image_size=(128, 128))
    for index in range(len(fixed)):
        got = tuple(fixed.getitem(index)["video"].shape)
        assert got == (3, shortest, 128, 128), f"VideoTextDataset row {index}: {got}"
    print(f"Open-Sora read {len(variable)} rows as their shard rows")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(check(sys.argv[1], json.loads(Path(sys.argv[2]).read_text())))
    except AssertionError as exc:
        print(f"mismatch: {exc}", file=sys.stderr)
        sys.exit(1)
