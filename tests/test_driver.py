"""The driver of a Ray run only commits: media bytes stay with the workers that write the
shards, and the driver's memory does not grow with the corpus."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pytest

from conftest import read_manifest, read_shards, short_video, write_recipe

# Lossless clips: megabytes of media per source, so that media passing through the driver
# would show in its memory as well as in the bytes it receives.
PROCESS = [{"shot_split": {}}, {"clip_length": {"min_frames": 10, "max_frames": 60}},
           {"encode_clips": {"crf": 0, "preset": "ultrafast"}}]

# The driver's own peak memory, as the kernel counts it for this process only (Ray's workers
# are other processes).
PEAK_RSS = """
import resource, sys
from bricks.engine.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print("peak_rss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def one_source(tmp_path_factory) -> Path:
    return short_video(tmp_path_factory.mktemp("src") / "grainy.mp4", shots=((40, False), (40, False)),
                       width=640, height=360, grain=12.0).path


def _corpus(folder: Path, video: Path, copies: int) -> Path:
    folder.mkdir()
    for k in range(copies):
        shutil.copy(video, folder / f"copy{k:03d}.mp4")
    return folder


def _run_driver(tmp_path: Path, name: str, inputs: Path) -> tuple[int, dict]:
    folder = tmp_path / name
    folder.mkdir()
    recipe = write_recipe(folder, PROCESS, input=inputs, output=folder / "out",
                          executor={"mode": "ray", "num_cpus": 2})
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, "run", str(recipe)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    peak = int(done.stdout.split("peak_rss_kib")[-1].split()[0])
    return peak, read_manifest(folder / "out")


def test_media_bytes_never_reach_the_driver_and_its_memory_stays_flat(tmp_path, one_source):
    small_peak, small = _run_driver(tmp_path, "few", _corpus(tmp_path / "few-in", one_source, 3))
    large_peak, large = _run_driver(tmp_path, "many", _corpus(tmp_path / "many-in", one_source, 30))
    media = pc.sum(pc.binary_length(read_shards(tmp_path / "many" / "out").column("media"))).as_py()
    assert large["samples"]["video"] == 10 * small["samples"]["video"] > 0
    # The driver hears of each source's files and rejects, never of their media.
    assert media > 30 * 1_000_000 and large["driver"]["bytes_received"] < media / 100
    assert large_peak < 1.2 * small_peak, json.dumps({"3 sources": small_peak, "30 sources": large_peak})
