"""Synthetic "brick film" stop-motion videos with known cut points.

The demo command and the tests need footage whose ground truth is known exactly: where every
cut is, which shots are static, and how the file is encoded (constant or variable frame rate,
keyframe interval, display rotation). This module draws such footage with numpy -- flat
backgrounds over a studded baseplate, a few coloured bricks that hop "on twos" like real stop
motion -- encodes it with PyAV, and returns a `VideoTruth` for each file.

The colours and motion are tuned so that PySceneDetect's `ContentDetector` at its default
threshold (27) finds every cut and nothing else, while Farneback optical flow sampled at 2 fps
is clearly non-zero inside moving shots and ~0 inside static ones.

CLI: ``python -m bricks.common.synthetic OUT_DIR [--num-videos N] [--width W] [--height H]
[--fps F] [--seed S]`` writes ``brickfilm-000.mp4`` ... and ``truth.json`` into OUT_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

__all__ = [
    "ShotSpec",
    "VideoTruth",
    "render_shot_frames",
    "write_video",
    "write_vfr_video",
    "generate_corpus",
    "main",
]

# Shot backgrounds (RGB). Neighbours, including last -> first, alternate light/dark and sit far
# apart in hue, so every cut scores well above ContentDetector's 27 (the weakest pair, 1 -> 2,
# scores about 60); shot k uses entry k % len.
_BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (135, 206, 250),  # light sky blue
    (140, 20, 20),  # dark red
    (250, 220, 90),  # light gold
    (20, 40, 130),  # dark blue
    (150, 230, 120),  # light green
    (110, 20, 100),  # dark purple
)

# Classic brick colours (RGB).
_BRICK_COLOURS: tuple[tuple[int, int, int], ...] = (
    (201, 26, 9),  # bright red
    (242, 205, 55),  # bright yellow
    (0, 85, 191),  # bright blue
    (35, 120, 65),  # dark green
    (244, 244, 244),  # white
    (27, 42, 52),  # black
    (254, 138, 24),  # orange
    (160, 165, 169),  # light bluish grey
)

_VALID_ROTATIONS = (0, 90, 180, 270)
_VFR_TIME_BASE = Fraction(1, 90000)


@dataclass(frozen=True)
class ShotSpec:
    """One shot: its length in frames, whether nothing moves, and the seed of its layout."""

    num_frames: int
    static: bool = False
    seed: int = 0


@dataclass
class VideoTruth:
    """Ground truth of one generated video.

    `cuts` are the frame indices where shots 2..n start, so shot k spans
    ``[cuts[k-1], cuts[k])`` (with 0 and `num_frames` at the ends); `static_shots` are the
    ``[start, end)`` frame ranges of shots in which nothing moves. `rotation` is the display
    rotation stored in the container, counter-clockwise degrees as PyAV's `frame.rotation`
    reports it (modulo 360).
    """

    path: str
    fps: float
    width: int
    height: int
    num_frames: int
    cuts: list[int]
    static_shots: list[tuple[int, int]]
    rotation: int = 0
    # VFR files only: presentation time of each frame, seconds.
    frame_times: list[float] | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["static_shots"] = [list(r) for r in self.static_shots]
        if d["frame_times"] is None:
            del d["frame_times"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VideoTruth:
        d = dict(d)
        d["static_shots"] = [tuple(r) for r in d.get("static_shots", [])]
        return cls(**d)

    def shot_ranges(self) -> list[tuple[int, int]]:
        """``[start, end)`` of every shot, in order."""
        bounds = [0, *self.cuts, self.num_frames]
        return list(zip(bounds[:-1], bounds[1:]))


# --------------------------------------------------------------------------------------------
# Drawing


def _darker(colour: Sequence[int], factor: float) -> np.ndarray:
    return (np.asarray(colour, dtype=np.float32) * factor).astype(np.uint8)


def _stud_tile(pitch: int, plate: np.ndarray) -> np.ndarray:
    """One baseplate cell: a round stud, lit from the top-left, on the plate colour."""
    yy, xx = np.mgrid[0:pitch, 0:pitch].astype(np.float32) + 0.5
    c = pitch / 2.0
    r = pitch * 0.32
    d2 = (yy - c) ** 2 + (xx - c) ** 2
    tile = np.empty((pitch, pitch, 3), np.uint8)
    tile[:] = plate
    # Darker rim first, then a lighter cap: reads as a raised stud even at small sizes.
    tile[d2 <= (r + 0.8) ** 2] = _darker(plate, 0.7)
    lit = np.minimum(plate.astype(np.int32) + 35, 255).astype(np.uint8)
    tile[d2 <= r**2] = lit
    return tile


def _edge_margin(width: int, height: int) -> int:
    """Flat border kept free of studs and bricks.

    OpenCV's Farneback treats samples past the right/bottom edge as zero, so texture touching
    the border shows up as spurious flow even between identical frames; a flat border keeps
    static shots at ~0 flow.
    """
    return max(3, round(min(width, height) * 0.08))


def _background(width: int, height: int, shot_index: int) -> np.ndarray:
    colour = np.asarray(_BACKGROUNDS[shot_index % len(_BACKGROUNDS)], np.uint8)
    frame = np.empty((height, width, 3), np.uint8)
    frame[:] = colour
    plate_h = max(4, round(height * 0.25))
    pitch = max(4, round(height * 0.06))
    margin = _edge_margin(width, height)
    plate = _darker(colour, 0.55)
    frame[height - plate_h :] = plate
    cols = max(0, (width - 2 * margin) // pitch)
    rows = max(0, (plate_h - margin) // pitch)
    x0 = (width - cols * pitch) // 2
    y0 = height - plate_h
    frame[y0 : y0 + rows * pitch, x0 : x0 + cols * pitch] = np.tile(
        _stud_tile(pitch, plate), (rows, cols, 1)
    )
    return frame


def _brick_sprite(
    studs: int, rows: int, pitch: int, colour: Sequence[int], line: int
) -> tuple[np.ndarray, np.ndarray]:
    """Side view of a 1 x `studs` brick, `rows` bricks tall: RGB image plus opacity mask."""
    body_h = max(3, round(pitch * 1.2)) * rows
    stud_h = max(2, round(pitch * 0.2))
    w = studs * pitch
    h = body_h + stud_h
    body = np.asarray(colour, np.uint8)
    outline = _darker(colour, 0.6)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = outline
    mask = np.zeros((h, w), bool)
    mask[stud_h:] = True
    img[stud_h + line : h - line, line : w - line] = body
    # A lighter band under the top edge gives Farneback some texture to latch onto.
    band = max(1, round(pitch * 0.25))
    img[stud_h + line : stud_h + line + band, line : w - line] = np.minimum(
        body.astype(np.int32) + 40, 255
    ).astype(np.uint8)
    stud_w = max(2, round(pitch * 0.6))
    for k in range(studs):
        x0 = k * pitch + (pitch - stud_w) // 2
        mask[:stud_h, x0 : x0 + stud_w] = True
        img[line:stud_h, x0 + line : x0 + stud_w - line] = body
    return img, mask


def _paste(frame: np.ndarray, sprite: np.ndarray, mask: np.ndarray, x: int, y: int) -> None:
    region = frame[y : y + mask.shape[0], x : x + mask.shape[1]]  # clipped on tiny frames
    h, w = region.shape[:2]
    np.copyto(region, sprite[:h, :w], where=mask[:h, :w, None])


def _bounce(pos: float, vel: float, hi: float) -> tuple[float, float]:
    """Advance one step inside [0, hi], reflecting off the edges."""
    pos += vel
    if pos < 0:
        pos, vel = -pos, -vel
    if pos > hi:
        pos, vel = 2 * hi - pos, -vel
    return min(max(pos, 0.0), hi), vel


@dataclass
class _Brick:
    sprite: np.ndarray
    mask: np.ndarray
    x: float
    y: float
    vx: float
    vy: float
    max_x: float
    max_y: float

    def step(self) -> None:
        self.x, self.vx = _bounce(self.x, self.vx, self.max_x)
        self.y, self.vy = _bounce(self.y, self.vy, self.max_y)


def render_shot_frames(
    spec: ShotSpec, width: int, height: int, shot_index: int
) -> Iterator[np.ndarray]:
    """Yield the ``spec.num_frames`` frames of one shot as HxWx3 uint8 RGB arrays.

    The background is chosen by `shot_index` so that consecutive shots always differ strongly;
    the bricks' sizes, colours, start positions and velocities come from ``spec.seed`` and
    `shot_index`. Moving shots advance the bricks every second frame by 1-5 % of the width;
    static shots repeat one image.
    """
    rng = np.random.default_rng([spec.seed, shot_index])
    background = _background(width, height, shot_index)
    margin = _edge_margin(width, height)
    pitch = max(4, round(width * 0.035))
    line = max(1, round(width / 320))
    lo_speed = max(2.0, width * 0.01)
    hi_speed = max(lo_speed, width * 0.05)

    bricks: list[_Brick] = []
    for _ in range(int(rng.integers(3, 6))):
        colour = _BRICK_COLOURS[int(rng.integers(len(_BRICK_COLOURS)))]
        studs = int(rng.integers(2, 6))
        rows = int(rng.integers(1, 3))
        sprite, mask = _brick_sprite(studs, rows, pitch, colour, line)
        max_x = max(0, width - 2 * margin - mask.shape[1])
        max_y = max(0, height - 2 * margin - mask.shape[0])
        angle = rng.uniform(0, 2 * np.pi)
        speed = rng.uniform(lo_speed, hi_speed)
        bricks.append(
            _Brick(
                sprite,
                mask,
                x=rng.uniform(0, max_x),
                y=rng.uniform(0, max_y),
                vx=speed * np.cos(angle),
                vy=speed * np.sin(angle),
                max_x=max_x,
                max_y=max_y,
            )
        )

    pose: np.ndarray | None = None
    for i in range(spec.num_frames):
        # On twos: a new pose every second frame; a static shot keeps its first pose.
        if i % 2 == 0 and (pose is None or not spec.static):
            if i:
                for b in bricks:
                    b.step()
            pose = background.copy()
            for b in bricks:
                _paste(pose, b.sprite, b.mask, margin + round(b.x), margin + round(b.y))
        yield pose.copy()  # callers may draw on what they get


# --------------------------------------------------------------------------------------------
# Encoding


def _temp_path(path: Path) -> Path:
    # Same folder so os.replace is atomic; same suffix so PyAV picks the right muxer; a leading
    # dot keeps half-written files out of globs such as *.mp4.
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


def _encoder_options(codec: str, crf: int) -> dict[str, str]:
    if codec in ("libx264", "libx265"):
        return {"crf": str(crf), "preset": "veryfast"}
    return {}


def _check_geometry(width: int, height: int) -> None:
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise ValueError(f"yuv420p needs even width and height >= 16, got {width}x{height}")


def _normalise_rotation(rotate: int) -> int:
    if rotate % 360 not in _VALID_ROTATIONS:
        raise ValueError(f"rotate must be one of {_VALID_ROTATIONS}, got {rotate}")
    return rotate % 360


def _truth_ranges(shots: Sequence[ShotSpec]) -> tuple[list[int], list[tuple[int, int]], int]:
    cuts: list[int] = []
    static: list[tuple[int, int]] = []
    start = 0
    for k, shot in enumerate(shots):
        if shot.num_frames < 1:
            raise ValueError(f"shot {k} has {shot.num_frames} frames")
        if k:
            cuts.append(start)
        if shot.static:
            static.append((start, start + shot.num_frames))
        start += shot.num_frames
    return cuts, static, start


def _encode(
    path: Path,
    shots: Sequence[ShotSpec],
    width: int,
    height: int,
    rate: Fraction,
    codec: str,
    crf: int,
    gop: int | None,
    rotate: int,
    time_base: Fraction,
    pts_of: Callable[[int], int],
    grain: float = 0.0,
    options: dict[str, str] | None = None,
) -> None:
    """Render `shots` into `path` (written in place); frame i gets pts ``pts_of(i)``."""
    noise = _grain_bank(width, height, grain)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, options={**_encoder_options(codec, crf), **(options or {})})
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = time_base
        if gop is not None:
            stream.codec_context.gop_size = gop
        if rotate:
            stream.set_display_rotation(rotate)
        i = 0
        for k, shot in enumerate(shots):
            for rgb in render_shot_frames(shot, width, height, k):
                if noise is not None:
                    rgb = np.clip(rgb.astype(np.int16) + noise[i % len(noise)], 0, 255).astype(np.uint8)
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts = pts_of(i)
                frame.time_base = time_base
                container.mux(stream.encode(frame))
                i += 1
        container.mux(stream.encode(None))


def _grain_bank(width: int, height: int, grain: float) -> np.ndarray | None:
    """Film grain: a few frames of Gaussian noise, cycled, so every frame differs like sensor
    noise does. Clean synthetic frames decode several times faster than real footage, which
    skews any timing taken against decoding."""
    if grain <= 0:
        return None
    rng = np.random.default_rng(12345)
    return np.round(rng.normal(0.0, grain, size=(7, height, width, 1))).astype(np.int16)


def _write_atomic(path: str | os.PathLike, encode: Callable[[Path], None]) -> Path:
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(final)
    try:
        encode(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def write_video(
    path: str | os.PathLike,
    shots: Sequence[ShotSpec],
    *,
    width: int = 320,
    height: int = 180,
    fps: float = 24,
    codec: str = "libx264",
    crf: int = 18,
    gop: int | None = None,
    rotate: int = 0,
    grain: float = 0.0,
    options: dict[str, str] | None = None,
) -> VideoTruth:
    """Render `shots` back to back into a constant-frame-rate video at `path`.

    `grain` adds film grain of that standard deviation (in 8-bit levels) to every frame, for
    benchmarks that need footage as costly to decode as a camera's. `options` go to the encoder
    over the defaults (e.g. ``{"x264-params": "open-gop=1"}`` for open GOPs, whose leading
    B-frames follow their key frame in decoding order but precede it on screen).
    Shot k starts where shot k-1 ends; frame i is presented at i / fps seconds. `gop` sets the
    keyframe interval when given. `rotate` (0, 90, 180 or 270) stores a display matrix in the
    container; PyAV reads it back as `frame.rotation` -- counter-clockwise degrees normalised
    to [-180, 180), so 270 reads back as -90 and 180 as -180. The pixels themselves are not
    rotated. The file is written under a temporary name in the same folder and moved into
    place when complete.
    """
    _check_geometry(width, height)
    rotate = _normalise_rotation(rotate)
    cuts, static, total = _truth_ranges(shots)
    rate = Fraction(fps).limit_denominator(1001)
    time_base = 1 / rate
    final = _write_atomic(
        path,
        lambda tmp: _encode(
            tmp, shots, width, height, rate, codec, crf, gop, rotate, time_base, lambda i: i, grain, options
        ),
    )
    return VideoTruth(str(final), float(rate), width, height, total, cuts, static, rotate)


def write_vfr_video(
    path: str | os.PathLike,
    shots: Sequence[ShotSpec] | None = None,
    *,
    width: int = 320,
    height: int = 180,
    frame_durations: Sequence[float] = (1 / 24, 1 / 12),
    codec: str = "libx264",
    crf: int = 18,
) -> VideoTruth:
    """Render `shots` into a variable-frame-rate video at `path`.

    Frame i lasts ``frame_durations[i % len(frame_durations)]`` seconds (by default alternating
    1/24 and 1/12 s), expressed as pts in a 1/90000 time base. Without `shots`, three moving
    shots of 30, 40 and 30 frames are used. The returned truth has `fps` = frames / duration
    and `frame_times` = each frame's presentation time in seconds.
    """
    _check_geometry(width, height)
    if shots is None:
        shots = [ShotSpec(30, seed=1), ShotSpec(40, seed=2), ShotSpec(30, seed=3)]
    cuts, static, total = _truth_ranges(shots)
    ticks = [round(d / _VFR_TIME_BASE) for d in frame_durations]
    if not ticks or min(ticks) < 1:
        raise ValueError("frame_durations must be positive")
    pts = np.concatenate([[0], np.cumsum([ticks[i % len(ticks)] for i in range(total)])])
    duration = float(pts[-1] * _VFR_TIME_BASE)
    # The nominal rate only seeds the encoder's rate control; timestamps carry the real timing.
    rate = Fraction(round(1 / min(frame_durations)))

    def encode(tmp: Path) -> None:
        pts_of = lambda i: int(pts[i])  # noqa: E731
        _encode(tmp, shots, width, height, rate, codec, crf, None, 0, _VFR_TIME_BASE, pts_of)

    final = _write_atomic(path, encode)
    times = [float(p * _VFR_TIME_BASE) for p in pts[:-1]]
    return VideoTruth(str(final), total / duration, width, height, total, cuts, static, 0, times)


# --------------------------------------------------------------------------------------------
# Corpus

_LONG_SHOT = 260  # longer than a typical clip-length cap, so splitters have work to do
_SHORT_SHOT = 10  # under ContentDetector's min_scene_len of 15 and typical min-length filters


def _corpus_shots(rng: np.random.Generator, video: int, num_videos: int) -> list[ShotSpec]:
    n = int(rng.integers(3, 6))
    lengths = [int(v) for v in rng.integers(20, 121, size=n)]
    special: set[int] = set()
    if video == 0:
        lengths[1] = _LONG_SHOT
        special.add(1)
    if video == min(1, num_videos - 1):
        # Last shot only: a short shot elsewhere would merge into its neighbour under
        # ContentDetector's min_scene_len, and its cut would not be detected.
        lengths[-1] = _SHORT_SHOT
        special.add(n - 1)
    static_at = -1
    if video % 2 == 0:  # every other video carries one static shot
        candidates = [k for k in range(n) if k not in special]
        static_at = candidates[int(rng.integers(len(candidates)))]
    seeds = rng.integers(0, 2**31, size=n)
    return [ShotSpec(lengths[k], static=k == static_at, seed=int(seeds[k])) for k in range(n)]


def _write_json_atomic(path: Path, payload: object) -> None:
    tmp = _temp_path(path)
    try:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def generate_corpus(
    out_dir: str | os.PathLike,
    *,
    num_videos: int = 6,
    width: int = 320,
    height: int = 180,
    fps: float = 24,
    seed: int = 0,
) -> list[VideoTruth]:
    """Write ``brickfilm-000.mp4`` ... and ``truth.json`` into `out_dir`; return the truths.

    Each video has 3-5 shots of 20-120 frames. Video 0 has a 260-frame shot (second shot);
    video 1 (video 0 when there is only one) ends with a 10-frame shot; even-numbered videos
    each carry one static shot. Output is deterministic given `seed`.
    """
    if num_videos < 1:
        raise ValueError("num_videos must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truths = []
    for v in range(num_videos):
        shots = _corpus_shots(rng, v, num_videos)
        truths.append(
            write_video(out / f"brickfilm-{v:03d}.mp4", shots, width=width, height=height, fps=fps)
        )
    _write_json_atomic(out / "truth.json", [t.to_dict() for t in truths])
    return truths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bricks.common.synthetic",
        description="Write a corpus of synthetic brick-film videos with known cuts.",
    )
    parser.add_argument("out_dir")
    parser.add_argument("--num-videos", type=int, default=6)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=180)
    parser.add_argument("--fps", type=float, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    truths = generate_corpus(
        args.out_dir,
        num_videos=args.num_videos,
        width=args.width,
        height=args.height,
        fps=args.fps,
        seed=args.seed,
    )
    for t in truths:
        print(f"{t.path}: {t.num_frames} frames, cuts {t.cuts}, static {t.static_shots}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
