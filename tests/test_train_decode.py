"""The trainer's reference-mode clips are decoded by the engine's own code: upright, found by
seeking to the key frame before the clip, from local paths and fsspec URIs alike."""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")

from bricks.engine.recipe import from_dict  # noqa: E402
from bricks.engine.run import run  # noqa: E402
from bricks.common.synthetic import ShotSpec, write_vfr_video, write_video  # noqa: E402
from bricks.common.video import DecodeStats  # noqa: E402
from bricks.train.buckets import Buckets, stable_seed  # noqa: E402
from bricks.train.decode import BadSample, read_clip, temporal_indices  # noqa: E402
from bricks.train.loader import ShardDataset  # noqa: E402
from bricks.train.shards import ShardIndex  # noqa: E402

from conftest import read_shards  # noqa: E402

SIZE = (144, 256)  # the 144p bucket at 16:9
T, INTERVAL = 8, 2


def shot_rows(tmp_path: Path, video: str) -> list[dict]:
    """`bricks-dj` with shot_split only: reference-mode rows, in source order."""
    out = tmp_path / "out"
    run(from_dict({"input": video, "output": str(out), "executor": {"mode": "local"},
                   "process": [{"shot_split": {}}]}))
    return sorted(read_shards(out).to_pylist(), key=lambda r: r["start_frame"])


def cover_and_crop(rgb: np.ndarray, target_h: int, target_w: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = max(target_h / h, target_w / w)
    sh, sw = max(target_h, round(h * scale)), max(target_w, round(w * scale))
    top, left = (sh - target_h) // 2, (sw - target_w) // 2
    return cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_LINEAR)[top:top + target_h, left:left + target_w]


def late_clip(rows: list[dict], path: str, **kwargs) -> tuple[torch.Tensor, DecodeStats]:
    row = rows[-1]
    stats = DecodeStats()
    clip = read_clip(path, T, INTERVAL, SIZE, np.random.default_rng(7), row["start_frame"], row["end_frame"],
                     stats=stats, **kwargs)
    return clip, stats


@pytest.mark.parametrize("rotate", [90, 270])
def test_a_rotated_source_trains_upright(tmp_path, rotate):
    truth = write_video(tmp_path / "rotated.mp4", [ShotSpec(40, seed=1), ShotSpec(40, seed=2)], rotate=rotate)
    out = tmp_path / "out"
    run(from_dict({"input": truth.path, "output": str(out), "executor": {"mode": "local"},
                   "process": [{"shot_split": {}}]}))
    shard = next((out / "shards").glob("*.parquet"))
    table = pq.read_table(shard)
    assert set(zip(table["width"].to_pylist(), table["height"].to_pylist())) == {(180, 320)}  # as displayed
    captioned = table.set_column(table.schema.get_field_index("text"), "text",
                                 pc.cast(pc.fill_null(table["text"], "a brick film"), table.schema.field("text").type))
    pq.write_table(captioned, shard)

    ds = ShardDataset(ShardIndex.build(str(out)), Buckets({"144p": {T: (1.0, 2)}}, frame_interval=INTERVAL), seed=5)
    batches = [b for b in ds if b["sample_id"]]
    assert batches and not any(b["skipped"] for b in batches)
    capture = cv2.VideoCapture(truth.path)  # OpenCV applies the display rotation when it reads
    upright = [capture.read()[1][:, :, ::-1] for _ in range(truth.num_frames)]
    rows = {r["sample_id"]: r for r in table.to_pylist()}
    for batch in batches:
        height, width = batch["height"], batch["width"]
        assert height > width  # a portrait bucket, as the shard's display size says
        for video, sample_id in zip(batch["video"], batch["sample_id"]):
            row = rows[sample_id]
            rng = np.random.default_rng(stable_seed("crop", 5, 0, sample_id))
            wanted = temporal_indices(row["end_frame"] - row["start_frame"], T, INTERVAL, rng)
            expected = np.stack([cover_and_crop(upright[row["start_frame"] + i], height, width) for i in wanted])
            ours = video.permute(1, 2, 3, 0).numpy()  # [T, H, W, 3]
            assert np.abs(ours.astype(int) - expected).mean() < 3


@pytest.mark.parametrize("kind", ["constant", "variable"])
def test_a_late_clip_seeks_and_gives_the_frames_of_decoding_from_the_start(tmp_path, kind):
    shots = [ShotSpec(40, seed=k) for k in range(5)]
    if kind == "constant":
        truth = write_video(tmp_path / "cfr.mp4", shots, gop=12)
    else:  # frames last 1/24 and 1/12 s in turn; key frames come at the cuts
        truth = write_vfr_video(tmp_path / "vfr.mp4", shots)
    rows = shot_rows(tmp_path, truth.path)
    assert [r["start_frame"] for r in rows] == [0] + truth.cuts
    sought, sought_stats = late_clip(rows, truth.path, start_time=rows[-1]["start_time"])
    counted, counted_stats = late_clip(rows, truth.path)  # no start_time: counted from frame 0
    assert torch.equal(sought, counted)
    clip_length = rows[-1]["end_frame"] - rows[-1]["start_frame"]
    assert counted_stats.frames >= rows[-1]["start_frame"] and sought_stats.frames <= clip_length + 12
    # And those are the right frames: PyAV decoding the whole file, the same frames picked.
    with av.open(truth.path) as container:
        every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    wanted = temporal_indices(clip_length, T, INTERVAL, np.random.default_rng(7))
    expected = np.stack([cover_and_crop(every[rows[-1]["start_frame"] + i], *SIZE) for i in wanted])
    assert np.abs(sought.permute(1, 2, 3, 0).numpy().astype(int) - expected).mean() < 3


def test_a_start_time_that_matches_no_frame_is_a_bad_sample(tmp_path):
    truth = write_video(tmp_path / "cfr.mp4", [ShotSpec(40, seed=1), ShotSpec(40, seed=2)], gop=12)
    rows = shot_rows(tmp_path, truth.path)
    with pytest.raises(BadSample, match=r"no frame at 1\.687500 s \(frame 40\)"):
        late_clip(rows, truth.path, start_time=rows[-1]["start_time"] + 0.5 / truth.fps)


def test_fsspec_uris_decode_like_local_paths(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    truth = write_video(tmp_path / "cfr.mp4", [ShotSpec(40, seed=1), ShotSpec(40, seed=2)], gop=12)
    rows = shot_rows(tmp_path, truth.path)
    local, _ = late_clip(rows, truth.path, start_time=rows[-1]["start_time"])
    memory = fsspec.filesystem("memory")
    memory.pipe("/bricks-test/cfr.mp4", Path(truth.path).read_bytes())
    try:
        for uri in ("memory://bricks-test/cfr.mp4", Path(truth.path).as_uri()):
            clip, stats = late_clip(rows, uri, start_time=rows[-1]["start_time"])
            assert torch.equal(clip, local) and stats.frames < truth.num_frames
    finally:
        memory.rm("/bricks-test", recursive=True)
    # The engine's reasons for sources it cannot open.
    with pytest.raises(BadSample, match="undecodable video: not found"):
        late_clip(rows, "memory://bricks-test/missing.mp4")
    with pytest.raises(BadSample, match="undecodable video: file not found"):
        late_clip(rows, str(tmp_path / "missing.mp4"))
