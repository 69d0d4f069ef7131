"""Ray runs are quiet and local: no warnings about Ray's own settings, no colour codes in
captured output, and a Ray started by bricks listens on 127.0.0.1 only."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from conftest import write_recipe

NOISE = ("Token authentication", "core_worker.cc", "constructor arguments in the object store",
         "DeprecationWarning", "\x1b[")


def clean_env() -> dict[str, str]:
    drop = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_COLOR_PREFIX", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    return {k: v for k, v in os.environ.items() if k not in drop}


def test_a_ray_run_with_a_model_actor_pool_prints_no_ray_noise(tmp_path, corpus):
    recipe = write_recipe(tmp_path, [
        {"shot_split": {"min_scene_len": 15}}, {"clip_length": {"min_frames": 15, "max_frames": 60}},
        {"aesthetic_filter": {"preset": "tiny", "device": "cpu", "min_score": 0, "batch_size": 8}},
    ], input=corpus[0], executor={"mode": "ray", "num_cpus": 2})
    proc = subprocess.run([sys.executable, "-m", "bricks.engine.cli", "run", str(recipe)], capture_output=True,
                          text=True, env=clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    for noise in NOISE:
        assert noise not in proc.stderr, proc.stderr
        assert noise not in proc.stdout, proc.stdout
    # The actors' own log lines still come through, prefixed with the worker but uncoloured.
    assert "(MapWorker(MapBatches(ModelActor)) pid=" in proc.stderr


def test_ray_started_by_bricks_listens_on_loopback_only():
    script = textwrap.dedent("""
        from bricks.engine.ray_cluster import init_ray
        from bricks.engine.recipe import ExecutorConfig

        init_ray(ExecutorConfig(num_cpus=1))
        import ray

        @ray.remote
        def worker_address():
            return ray.util.get_node_ip_address()

        print(ray.util.get_node_ip_address(), ray.get_runtime_context().gcs_address, ray.get(worker_address.remote()))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=clean_env(),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    node, gcs, worker = proc.stdout.split()
    assert node == "127.0.0.1" and worker == "127.0.0.1"
    assert gcs.rsplit(":", 1)[0] == "127.0.0.1"
    assert "Token authentication" not in proc.stderr
