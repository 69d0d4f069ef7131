"""A two-node Ray cluster on this machine (`ray start --head` and a second `ray start
--address`), started by the test: `bricks-dj run --address` spreads sources over both nodes
and writes the shards an in-process run writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, read_manifest, read_rejects, read_shards, short_video, write_recipe

RAY = str(Path(sys.executable).with_name("ray"))
PROCESS = [{"shot_split": {}}, {"clip_length": {"min_frames": 10, "max_frames": 40}},
           {"motion_filter": {"min_score": 0.0}}, {"middle_frame": {}}, {"encode_clips": {"short_side": 64}}]




def _wait_for_port(host: str, port: int, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with status {process.returncode}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"the Ray head did not listen on {host}:{port} in {timeout:.0f} s")


def _alive_nodes(address: str, env: dict, expected: int, timeout: float = 120.0) -> list[str]:
    script = f"""
import json, time, ray
ray.init(address={address!r}, logging_level="ERROR")
deadline = time.monotonic() + {timeout}
while True:
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    if len(nodes) >= {expected} or time.monotonic() > deadline:
        break
    time.sleep(0.2)
print(json.dumps(nodes))
"""
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout + 60)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """(address, env, node ids): a head and a worker node of one CPU each. Multi-node Ray binds
    to this machine's network address (it refuses to build a cluster on 127.0.0.1 only)."""
    import ray

    host = ray.util.get_node_ip_address()
    port = free_port("")  # the head listens on the network address
    logs = tmp_path_factory.mktemp("ray-logs")
    # Token authentication, as Ray starts clusters by default; every process here reads the token.
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    common = ["--block", f"--node-ip-address={host}", "--num-cpus=1", "--disable-usage-stats"]
    started = []
    try:
        with open(logs / "head.log", "w") as log:
            started.append(subprocess.Popen(
                [RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
                 f"--temp-dir={tmp_path_factory.mktemp('ray')}", *common],
                env=env, stdout=log, stderr=subprocess.STDOUT))
        _wait_for_port(host, port, started[0])
        address = f"{host}:{port}"
        with open(logs / "worker.log", "w") as log:
            started.append(subprocess.Popen([RAY, "start", f"--address={address}", *common],
                                            env=env, stdout=log, stderr=subprocess.STDOUT))
        nodes = _alive_nodes(address, env, expected=2)
        assert len(nodes) == 2, f"the worker node did not join: {(logs / 'worker.log').read_text()[-2000:]}"
        yield address, env, nodes
    finally:
        for process in reversed(started):  # `ray start --block` stops its node on SIGTERM
            process.terminate()
        for process in started:
            try:
                process.wait(90)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="module")
def six_videos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("six")
    for k in range(6):
        short_video(folder / f"v{k}.mp4", shots=((24 + 4 * k, False), (30, False)))
    return folder


def _rows(out: Path) -> list[dict]:
    return sorted(read_shards(out).to_pylist(), key=lambda r: r["sample_id"])


def test_a_recipe_runs_on_both_nodes_of_a_cluster_and_writes_the_local_shards(tmp_path, two_node_cluster, six_videos):
    address, env, nodes = two_node_cluster
    (tmp_path / "local").mkdir()
    local = write_recipe(tmp_path / "local", PROCESS, input=six_videos, output=tmp_path / "local" / "out")
    done = subprocess.run([sys.executable, "-m", "bricks.engine.cli", "run", str(local), "--local"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (tmp_path / "ray").mkdir()
    on_cluster = write_recipe(tmp_path / "ray", PROCESS, input=six_videos, output=tmp_path / "ray" / "out",
                              executor={"mode": "ray", "cpus_per_source": 1})
    done = subprocess.run([sys.executable, "-m", "bricks.engine.cli", "run", str(on_cluster), "--address", address],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = read_manifest(tmp_path / "ray" / "out")
    by_node = manifest["sources"]["by_node"]
    assert set(by_node) == set(nodes) and sum(by_node.values()) == 6  # both nodes processed sources
    assert read_manifest(tmp_path / "local" / "out")["sources"]["by_node"] == {socket.gethostname(): 6}
    ours, theirs = _rows(tmp_path / "ray" / "out"), _rows(tmp_path / "local" / "out")
    assert len(ours) > 6 and ours == theirs
    assert read_rejects(tmp_path / "ray" / "out").to_pylist() == read_rejects(tmp_path / "local" / "out").to_pylist()
