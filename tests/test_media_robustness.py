"""Corrupt packets in the middle of a source: decoding goes on past them, they are counted in
the manifest, and no shot or clip spans the frames they lost."""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from bricks.engine.frames import RangeFrames
from bricks.engine.operator import FrameRequest
from bricks.engine.recipe import from_dict
from bricks.engine.run import run
from bricks.common.synthetic import ShotSpec, write_video
from bricks.common.video import DecodeStats, decode, open_container

from conftest import read_manifest, read_rejects, read_shards

CUT = 80  # the real cut of the generated video
FRAMES = 250
CORRUPT_AT = 150  # the presentation index of the packet where 4 KB are flipped


def flip_bytes_at_frame(src: Path, dst: Path, frame: int, nbytes: int = 4096) -> None:
    """A copy of `src` with `nbytes` bytes inverted from the packet of `frame` on: the
    container stays readable, the packets there do not decode."""
    with av.open(str(src)) as container:
        stream = container.streams.video[0]
        positions = sorted((p.pts, p.pos) for p in container.demux(stream) if p.pts is not None)
    start = positions[frame][1]
    data = bytearray(src.read_bytes())
    data[start:start + nbytes] = bytes(b ^ 0xFF for b in data[start:start + nbytes])
    dst.write_bytes(bytes(data))


def decodable(path: Path) -> tuple[list[int], int]:
    """The reference: pts of the frames FFmpeg gives when each packet is decoded on its own and
    refused ones are skipped, and how many were refused."""
    pts, refused = [], 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            try:
                pts += [frame.pts for frame in stream.decode(packet)]
            except av.InvalidDataError:
                refused += 1
    return pts, refused


def all_pts(path: Path) -> list[int]:
    with av.open(str(path)) as container:
        return [frame.pts for frame in container.decode(video=0)]


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("damaged")
    clean = folder / "clean.mp4"
    # 640x360: a 16 MB frame buffer holds about 45 of its frames, so long shots overflow it.
    write_video(clean, [ShotSpec(CUT, seed=1), ShotSpec(FRAMES - CUT, seed=2)], width=640, height=360, gop=24)
    bad = folder / "bad.mp4"
    flip_bytes_at_frame(clean, bad, CORRUPT_AT)
    kept, refused = decodable(bad)
    order = {p: i for i, p in enumerate(all_pts(clean))}
    # Decoded index of each frame that follows lost ones.
    gaps = [i for i in range(1, len(kept)) if order[kept[i]] - order[kept[i - 1]] > 1]
    assert refused and gaps and len(kept) + refused == FRAMES  # the damage is mid-file, as meant
    return {"clean": clean, "bad": bad, "kept": kept, "refused": refused, "gaps": gaps}


def test_container_decode_alone_would_stop_at_the_damage(damaged):
    decoded = 0
    with pytest.raises(av.InvalidDataError):
        with av.open(str(damaged["bad"])) as container:
            for _ in container.decode(video=0):
                decoded += 1
    assert decoded < CORRUPT_AT


@pytest.mark.parametrize("threads", [1, 0])
def test_decoding_skips_refused_packets_and_marks_the_gap(damaged, threads):
    stats = DecodeStats()
    frames = list(decode(str(damaged["bad"]), threads, stats=stats))
    assert [f.pts for f in frames] == damaged["kept"] and [f.index for f in frames] == list(range(len(frames)))
    assert stats.skipped_packets == damaged["refused"] and stats.frames == len(frames)
    assert [f.index for f in frames if f.after_gap] == damaged["gaps"]
    clean = list(decode(str(damaged["clean"]), threads))
    assert len(clean) == FRAMES and not any(f.after_gap for f in clean)


@pytest.mark.parametrize("threads", [1, 0])
def test_a_run_keeps_the_frames_after_the_damage_and_cuts_at_the_gap(tmp_path, damaged, threads):
    out = tmp_path / "out"
    # clip_length right after shot_split: its windows are settled while the shot is still open.
    manifest = run(from_dict({"input": str(damaged["bad"]), "output": str(out),
                              "executor": {"mode": "local", "decode_threads": threads},
                              "process": [{"shot_split": {}}, {"clip_length": {"min_frames": 1, "max_frames": 40}}]}))
    rows = sorted((r["start_frame"], r["end_frame"]) for r in read_shards(out).to_pylist())
    kept = len(damaged["kept"])
    assert rows[0][0] == 0 and rows[-1][1] == kept and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    starts = {start for start, _ in rows}
    for gap in damaged["gaps"]:
        assert gap in starts and not any(start < gap < end for start, end in rows)
    assert CUT in starts
    assert manifest["decode"]["frames"] == kept
    assert manifest["decode"]["skipped_packets"] == damaged["refused"]
    assert manifest["decode"]["skipped_packets_by_source"] == {str(damaged["bad"]): damaged["refused"]}
    assert manifest["sources"]["kept"] == 1 and read_rejects(out) is None
    assert read_manifest(out)["decode"]["skipped_packets"] == damaged["refused"]


def test_clean_sources_count_no_skipped_packets(tmp_path, damaged):
    manifest = run(from_dict({"input": str(damaged["clean"]), "output": str(tmp_path / "out"),
                              "executor": {"mode": "local"}, "process": [{"shot_split": {}}]}))
    assert manifest["decode"]["frames"] == FRAMES
    assert (manifest["decode"]["skipped_packets"], manifest["decode"]["skipped_packets_by_source"]) == (0, {})
    rows = read_shards(tmp_path / "out").to_pylist()
    assert sorted(r["start_frame"] for r in rows) == [0, CUT]


def test_range_frames_decode_again_across_the_gap(damaged):
    """A shot that overflowed the frame buffer is decoded again from the key frame before it,
    which may lie before the damage: the frames served are those of the main pass."""
    main = list(decode(str(damaged["bad"])))
    arrays = {f.index: f.frame.to_ndarray(format="rgb24") for f in main}
    request = FrameRequest("all", pixel_format="rgb24")
    gap = damaged["gaps"][0]
    for start, end in ((gap, min(gap + 20, len(main))), (gap - 20, gap), (damaged["gaps"][-1], len(main))):
        frames = RangeFrames(str(damaged["bad"]), [f.pts for f in main], 24.0, 0, 0)
        try:
            served = frames.serve({"start_frame": start, "end_frame": end}, request)
        finally:
            frames.close()
        assert served.indices == list(range(start, end))
        assert all(np.array_equal(a, arrays[i]) for i, a in zip(served.indices, served.arrays))
        assert frames.frames_decoded < len(main)  # it sought instead of decoding from the start


def test_shots_overflowing_the_buffer_are_served_across_the_gap(tmp_path, damaged):
    out = tmp_path / "out"
    manifest = run(from_dict({"input": str(damaged["bad"]), "output": str(out),
                              "executor": {"mode": "local", "frame_buffer_mb": 16},
                              "process": [{"shot_split": {}}, {"middle_frame": {}}]}))
    assert manifest["decode"]["frames"] > len(damaged["kept"])  # shots were decoded again
    rows = read_shards(out).to_pylist()
    images = [r for r in rows if r["kind"] == "image"]
    assert read_rejects(out) is None and len(images) == len(rows) - len(images)
    main = {f.index: f.frame.to_ndarray(format="rgb24") for f in decode(str(damaged["bad"]))}
    for image in images:
        rgb = cv2.imdecode(np.frombuffer(image["media"], np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
        assert np.abs(rgb.astype(int) - main[image["start_frame"]]).mean() < 3  # JPEG's loss only


def test_opening_a_source_takes_ffmpeg_logs_off_the_python_callback(corpus):
    # torchvision's video module calls av.logging.set_level on import; the Python log callback it
    # installs deadlocks when a frame-threaded decoder is closed while one of its threads logs.
    path = corpus[1][0].path
    av.logging.set_level(av.logging.ERROR)
    try:
        with open_container(path):
            pass
        assert av.logging.get_level() is None
    finally:
        av.logging.set_level(None)
