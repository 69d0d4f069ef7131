"""vlm_caption end to end: flags, cleaning, prompt overrides, the OpenAI-compatible backend
against a local server, and the transformers backend on a tiny model saved to a folder."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("transformers")

from bricks.engine.operator import FatalModelError
from bricks.engine.recipe import from_dict
from bricks.engine.run import run
from bricks.operators.vlm_caption import caption_flag, clean_caption

from conftest import read_rejects, read_shards


@pytest.mark.parametrize("answer, flag", [
    ("No movement", "No movement"), ("no movement.", "No movement"), ('"Single image."', "Single image"),
    ("  NOT ENOUGH   information!", "Not enough information"), ("No movement at all in the scene", None),
    ("A red figure walks.", None),
])
def test_flags_compare_loosely(answer, flag):
    assert caption_flag(clean_caption(answer)) == flag


def test_cleaning_strips_quotes_and_labels():
    assert clean_caption('Caption: "A red car drives past a yellow house."') == "A red car drives past a yellow house."
    assert clean_caption("“Description: two figures talk.”\n") == "two figures talk."
    assert clean_caption("The scene's light is warm.") == "The scene's light is warm."


class CaptionServer:
    """An OpenAI-compatible endpoint on loopback answering by the number of images."""

    def __init__(self, answers: dict[int, str]) -> None:
        self.answers, self.prompts = answers, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self._send(200, {"data": [{"id": "test-model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][0]["content"]
                images = [c for c in content if c["type"] == "image_url"]
                assert all(base64.b64decode(c["image_url"]["url"].split(",", 1)[1])[:2] == b"\xff\xd8" for c in images)
                outer.prompts.append(content[-1]["text"])
                answer = outer.answers[len(images)]
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": answer}}]})

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    srv = CaptionServer({3: 'Caption: "A yellow figure waves."', 1: "No movement."})
    yield srv
    srv.close()


def caption_recipe(corpus, out, **params):
    return from_dict({"input": str(corpus[0]), "output": str(out), "executor": {"mode": "local"},
                      "process": [{"shot_split": {}}, {"middle_frame": {}},
                                  {"vlm_caption": {"backend": "openai", "model": "test-model", "batch_size": 4,
                                                   "retries": 1, **params}}]})


def test_openai_backend_captions_clips_and_drops_flags(tmp_path, corpus, server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # loopback: no key needed
    manifest = run(caption_recipe(corpus, tmp_path / "out", base_url=server.url))
    kept = read_shards(tmp_path / "out").to_pylist()
    # Clips get three frames and a caption; images get one frame, and this server flags them.
    assert kept and all(r["kind"] == "video" and r["text"] == "A yellow figure waves." for r in kept)
    flagged = [r for r in read_rejects(tmp_path / "out").to_pylist() if r["op"] == "2:vlm_caption"]
    assert len(flagged) == len(kept) and all(r["kind"] == "image" for r in flagged)
    assert all(r["reason"] == "caption flag: No movement" for r in flagged)
    op = manifest["ops"][2]
    assert (op["in"], op["out"], op["dropped"]) == (2 * len(kept), len(kept), len(kept))


def test_prompts_can_be_overridden_inline_or_from_a_file(tmp_path, corpus, server):
    prompt_file = tmp_path / "image_prompt.txt"
    prompt_file.write_text("Say what you see.\n")
    run(caption_recipe(corpus, tmp_path / "out", base_url=server.url, video_prompt="Describe the clip.",
                       image_prompt_file=str(prompt_file)))
    assert set(server.prompts) == {"Describe the clip.", "Say what you see."}


def test_an_endpoint_that_is_down_stops_the_run_before_decoding(tmp_path, corpus):
    import socket

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FatalModelError, match="cannot reach"):
        run(caption_recipe(corpus, tmp_path / "out", base_url=f"http://127.0.0.1:{port}/v1", timeout=1))
    assert not (tmp_path / "out").exists()


def test_transformers_backend_loads_a_model_folder(tmp_path, corpus):
    from bricks.operators.vlm_backends.tiny import build_tiny_vlm

    model, processor = build_tiny_vlm()
    folder = tmp_path / "tiny-qwen2-vl"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    out = tmp_path / "out"
    manifest = run(from_dict({
        "input": str(corpus[1][1].path), "output": str(out), "executor": {"mode": "local"},
        "process": [{"shot_split": {}}, {"vlm_caption": {"backend": "transformers", "model_path": str(folder),
                                                         "device": "cpu", "batch_size": 2, "max_new_tokens": 8}}]}))
    op = manifest["ops"][1]
    assert op["failed"] == 0 and op["in"] == op["out"] + op["dropped"] > 0
    texts = read_shards(out).column("text").to_pylist()
    assert texts and all(isinstance(t, str) and t for t in texts)


def test_missing_vlm_folder_is_a_clear_error(tmp_path, corpus):
    from bricks.common.weights import MissingModelError

    recipe = from_dict({"input": str(corpus[0]), "output": str(tmp_path / "out"),
                        "process": [{"shot_split": {}}, {"vlm_caption": {"backend": "transformers", "device": "cpu",
                                                                         "model_path": str(tmp_path / "nope")}}]})
    with pytest.raises(MissingModelError, match="does not exist"):
        run(recipe)


def test_a_missing_api_key_is_a_clear_error(tmp_path, corpus, monkeypatch):
    monkeypatch.delenv("MY_KEY", raising=False)
    with pytest.raises(FatalModelError, match=r"vlm_caption: .*MY_KEY"):
        run(caption_recipe(corpus, tmp_path / "out", base_url="https://api.example.invalid/v1", api_key_env="MY_KEY"))


def test_an_endpoint_needs_no_local_device():
    """`device` only matters where the model is loaded: an endpoint asks for no GPU, on Ray or here."""
    from bricks.engine.model_stage import resolve_device
    from bricks.operators.vlm_caption import VlmCaption, VlmCaptionParams

    remote = VlmCaption(VlmCaptionParams(backend="openai", base_url="http://127.0.0.1:9/v1"))
    assert remote.params.device == "auto" and remote.resources.gpus == 0 and resolve_device(remote) == "cpu"
    local = VlmCaption(VlmCaptionParams(backend="transformers"))
    assert local.resources.gpus == 1 and VlmCaption(VlmCaptionParams(device="cpu")).resources.gpus == 0


def test_the_endpoint_is_base_url_with_api_base_as_its_alias(tmp_path):
    from bricks.engine import plan
    from bricks.engine.recipe import RecipeError

    def build(**params):
        return plan.build(from_dict({"input": str(tmp_path), "output": str(tmp_path / "out"),
                                     "process": [{"shot_split": {}}, {"vlm_caption": {"backend": "openai", **params}}]}))

    for name in ("base_url", "api_base"):
        op = build(**{name: "http://127.0.0.1:9/v1"}).model_steps[0].op
        assert op.params.base_url == "http://127.0.0.1:9/v1"
    with pytest.raises(RecipeError, match=r"vlm_caption: .*give the endpoint once: base_url"):
        build(base_url="http://127.0.0.1:9/v1", api_base="http://127.0.0.1:8/v1")
    with pytest.raises(RecipeError, match="unknown parameter 'baseurl'; did you mean 'base_url'"):
        build(baseurl="http://127.0.0.1:9/v1")


def test_an_empty_answer_drops_the_sample():
    from bricks.operators.vlm_caption import VlmCaption

    op = VlmCaption()
    assert op.keep({"text": ""}) == "empty caption: the model answered nothing"
    assert op.keep({"text": clean_caption('  "" ')}) == "empty caption: the model answered nothing"
    assert op.keep({"text": "A red house."}) is True
