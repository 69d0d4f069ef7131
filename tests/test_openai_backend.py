"""OpenAIBackend against a real local HTTP server that imitates /v1/chat/completions and /v1/models."""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import pytest

from bricks.operators.vlm_backends.base import CaptionRequest, EndpointDown
from bricks.operators.vlm_backends.openai_backend import OpenAIBackend

from conftest import free_port

KEY_ENV = "BRICKS_TEST_VLM_KEY"

# A reply: (status, extra headers, JSON-able body or raw text, seconds to wait before answering).
Reply = tuple[int, dict[str, str], object, float]


def completion(text: str) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


def echo_prompt(hit: int, body: dict) -> Reply:
    """Answer with the request's prompt, so tests can check which answer went where."""
    return 200, {}, completion("caption of " + body["messages"][0]["content"][-1]["text"]), 0.0


class FakeServer:
    """Records every hit; `chat` and `models` decide the replies. Tracks requests in flight."""

    def __init__(self) -> None:
        self.chat: Callable[[int, dict], Reply] = echo_prompt
        self.models: Reply = (200, {}, {"data": [{"id": "fake"}]}, 0.0)
        self.hits: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def chat_hits(self) -> list[dict]:
        return [hit for hit in self.hits if hit["path"] == "/v1/chat/completions"]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                with server.lock:
                    server.hits.append({"path": self.path, "headers": dict(self.headers)})
                self._send(server.models if self.path == "/v1/models" else (404, {}, "no route", 0.0))

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.hits.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    hit = len(server.chat_hits()) - 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                # A request is in flight until its reply starts: the client may send its next
                # one as soon as it has read this reply, before this handler returns.
                try:
                    status, headers, payload, delay = server.chat(hit, body)
                    time.sleep(delay)
                finally:
                    with server.lock:
                        server.in_flight -= 1
                self._send((status, headers, payload, 0.0))

            def _send(self, reply: Reply) -> None:
                status, headers, payload, delay = reply
                time.sleep(delay)
                data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        return Handler


@pytest.fixture
def server():
    fake = FakeServer()
    fake.thread.start()
    yield fake
    fake.httpd.shutdown()
    fake.httpd.server_close()


@pytest.fixture
def key(monkeypatch) -> str:
    monkeypatch.setenv(KEY_ENV, "sk-test-123")
    return "sk-test-123"


def backend(url: str, **options) -> tuple[OpenAIBackend, list[float]]:
    """A backend whose sleeps are recorded instead of waited."""
    options = {"model": "fake-vlm", "api_key_env": KEY_ENV, "retries": 3, "timeout": 5.0, **options}
    client = OpenAIBackend(base_url=url, **options)
    slept: list[float] = []
    client.sleep = slept.append
    return client, slept


def caption_request(prompt: str = "Describe the clip.", images: int = 1) -> CaptionRequest:
    return CaptionRequest(prompt=prompt, images=[f"jpeg-{i}".encode() for i in range(images)])




def test_answer_and_request_body(server, key):
    client, _ = backend(server.url, max_tokens=123, temperature=0.2)
    request = CaptionRequest(prompt="What happens?", images=[b"first", b"second", b"third"])

    assert client.generate([request]) == ["caption of What happens?"]

    (hit,) = server.chat_hits()
    assert hit["headers"]["Authorization"] == f"Bearer {key}"
    body = hit["body"]
    assert body["model"] == "fake-vlm"
    assert body["max_tokens"] == 123 and body["temperature"] == 0.2
    (message,) = body["messages"]
    assert message["role"] == "user"
    *images, text = message["content"]
    assert text == {"type": "text", "text": "What happens?"}
    prefix = "data:image/jpeg;base64,"
    urls = [part["image_url"]["url"] for part in images]
    assert all(part["type"] == "image_url" for part in images)
    assert all(url.startswith(prefix) for url in urls)
    assert [base64.b64decode(url[len(prefix):]) for url in urls] == [b"first", b"second", b"third"]


def test_local_server_needs_no_key(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    client, _ = backend(server.url)
    client.check()
    assert client.generate([caption_request("x")]) == ["caption of x"]
    assert all("Authorization" not in hit["headers"] for hit in server.hits)


def test_missing_key_for_remote_endpoint(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=KEY_ENV):
        OpenAIBackend(base_url="https://api.example.com/v1", model="gpt-4o", api_key_env=KEY_ENV)


def test_concurrency_and_order(server, key):
    def slow_echo(hit: int, body: dict) -> Reply:
        status, headers, payload, _ = echo_prompt(hit, body)
        return status, headers, payload, 0.05

    server.chat = slow_echo
    client, _ = backend(server.url, concurrency=4)
    prompts = [f"clip {i}" for i in range(16)]

    results = client.generate([caption_request(p) for p in prompts])

    assert results == [f"caption of {p}" for p in prompts]
    assert 2 <= server.max_in_flight <= 4


def test_429_then_success_honours_retry_after(server, key):
    def limited(hit: int, body: dict) -> Reply:
        if hit < 2:
            return 429, {"Retry-After": "7"}, {"error": "rate limited"}, 0.0
        return echo_prompt(hit, body)

    server.chat = limited
    client, slept = backend(server.url, backoff=0.5, max_backoff=30.0)

    assert client.generate([caption_request("a")]) == ["caption of a"]
    assert len(server.chat_hits()) == 3
    assert slept == [7.0, 7.0]


def test_retry_after_is_capped(server, key):
    def limited(hit: int, body: dict) -> Reply:
        return (429, {"Retry-After": "120"}, {}, 0.0) if hit == 0 else echo_prompt(hit, body)

    server.chat = limited
    client, slept = backend(server.url, max_backoff=4.0)
    assert client.generate([caption_request("a")]) == ["caption of a"]
    assert slept == [4.0]


def test_500_then_success_backs_off(server, key):
    def flaky(hit: int, body: dict) -> Reply:
        return (500, {}, {"error": "boom"}, 0.0) if hit == 0 else echo_prompt(hit, body)

    server.chat = flaky
    client, slept = backend(server.url, backoff=0.25)

    assert client.generate([caption_request("a")]) == ["caption of a"]
    assert len(server.chat_hits()) == 2
    assert slept == [0.25]


def test_timeout_then_success(server, key):
    def slow_first(hit: int, body: dict) -> Reply:
        status, headers, payload, _ = echo_prompt(hit, body)
        return status, headers, payload, (1.0 if hit == 0 else 0.0)

    server.chat = slow_first
    client, slept = backend(server.url, timeout=0.3)

    assert client.generate([caption_request("a")]) == ["caption of a"]
    assert len(server.chat_hits()) == 2
    assert len(slept) == 1


def test_400_fails_only_its_own_slot(server, key):
    def reject_bad(hit: int, body: dict) -> Reply:
        if body["messages"][0]["content"][-1]["text"] == "bad":
            return 400, {}, {"error": {"message": "image too large " + "x" * 500}}, 0.0
        return echo_prompt(hit, body)

    server.chat = reject_bad
    client, slept = backend(server.url)

    results = client.generate([caption_request(p) for p in ["one", "bad", "three"]])

    assert results[0] == "caption of one" and results[2] == "caption of three"
    assert isinstance(results[1], Exception)
    message = str(results[1])
    assert "400" in message and "image too large" in message
    assert "\n" not in message and len(message) < 300
    assert len(server.chat_hits()) == 3  # a 400 is not retried
    assert slept == []


def test_malformed_response_is_an_exception(server, key):
    server.chat = lambda hit, body: (200, {}, {"unexpected": True}, 0.0)
    client, _ = backend(server.url)
    (result,) = client.generate([caption_request()])
    assert isinstance(result, Exception) and "malformed" in str(result)


def test_429_retries_exhausted(server, key):
    server.chat = lambda hit, body: (429, {}, {"error": "slow down"}, 0.0)
    client, slept = backend(server.url, retries=2, backoff=1.0)

    (result,) = client.generate([caption_request()])

    assert isinstance(result, Exception) and "429" in str(result)
    assert len(server.chat_hits()) == 3
    assert slept == [1.0, 2.0]  # exponential: backoff * 2**attempt


def test_endpoint_down(key):
    url = f"http://127.0.0.1:{free_port()}/v1"
    client, slept = backend(url, retries=2)
    started = time.monotonic()

    with pytest.raises(EndpointDown, match="127.0.0.1") as raised:
        client.check()
    assert "/v1/models" in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(EndpointDown, match="/v1/chat/completions"):
        client.generate([caption_request(str(i)) for i in range(5)])

    assert time.monotonic() - started < 3.0
    assert slept and all(delay <= client.max_backoff for delay in slept)


def test_check_refused_key(server, key):
    server.models = (401, {}, {"error": "invalid api key"}, 0.0)
    client, _ = backend(server.url)
    with pytest.raises(EndpointDown, match=KEY_ENV):
        client.check()


def test_check_accepts_missing_models_route(server, key):
    server.models = (404, {}, "not found", 0.0)
    client, _ = backend(server.url)
    client.check()
    assert server.hits[0]["headers"]["Authorization"] == f"Bearer {key}"


# -- the API key: where it may go, and that no message quotes it ---------------------------


@pytest.fixture
def echoing(server):
    """`server`, with `echo(status, padding)` making its chat answers quote the Authorization header."""

    def echo(status: int, padding: int = 0) -> None:
        def reply(hit: int, body: dict) -> Reply:
            auth = server.chat_hits()[hit]["headers"].get("Authorization", "")
            return status, {}, "p" * padding + f"invalid credentials: {auth}", 0.0

        server.chat = reply

    server.echo = echo
    return server


@pytest.mark.parametrize("status, padding", [(400, 0), (500, 0), (200, 0), (400, 165)])
def test_an_echoed_key_is_redacted_from_the_failure(echoing, key, status, padding, caplog):
    # 200 with a body that is not a completion: "malformed response". Padding 165 puts the key
    # across the point where the quoted body is cut short (200 characters).
    echoing.echo(status, padding)
    client, _ = backend(echoing.url, retries=2)
    with caplog.at_level("DEBUG", logger="bricks"):
        (result,) = client.generate([caption_request()])
    assert isinstance(result, Exception)
    assert f"Bearer {key}" in echoing.chat_hits()[0]["headers"]["Authorization"]  # it was sent
    message = str(result)
    assert key[:5] not in message and key[:5] not in caplog.text
    if padding == 0:
        assert "invalid credentials: Bearer [redacted]" in message
    if status == 500:
        assert "retry 1" in caplog.text and "[redacted]" in caplog.text


def test_a_key_in_the_url_is_redacted_from_endpoint_down(key):
    url = f"http://user:{key}@127.0.0.1:{free_port()}/v1"
    client, _ = backend(url, retries=0)
    with pytest.raises(EndpointDown) as raised:
        client.check()
    assert key not in str(raised.value) and "user:[redacted]@127.0.0.1" in str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    with pytest.raises(EndpointDown) as raised:
        client.generate([caption_request()])
    assert key not in str(raised.value) and "cannot reach" in str(raised.value)


def test_a_key_with_a_line_break_is_refused_without_quoting_it(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-secret-456\n")
    with pytest.raises(ValueError) as raised:
        OpenAIBackend(base_url="https://api.example.com/v1", model="m", api_key_env=KEY_ENV)
    assert KEY_ENV in str(raised.value) and "sk-secret" not in str(raised.value)


@pytest.mark.parametrize("url", ["http://api.example.com/v1", "http://10.0.0.7:8000/v1",
                                 "http://vllm.localhost:8000/v1", "http://0.0.0.0:8000/v1"])
def test_the_key_does_not_go_over_plain_http_to_other_machines(key, url):
    with pytest.raises(ValueError, match="plain http to another machine.*allow_insecure_http: true"):
        OpenAIBackend(base_url=url, model="m", api_key_env=KEY_ENV)
    assert OpenAIBackend(base_url=url, model="m", api_key_env=KEY_ENV, allow_insecure_http=True).api_key == key


@pytest.mark.parametrize("url", ["https://api.example.com/v1", "http://localhost:8000/v1",
                                 "http://127.0.0.1:8000/v1", "http://127.3.2.1/v1", "http://[::1]:8000/v1"])
def test_the_key_goes_over_https_and_to_loopback(key, url):
    assert OpenAIBackend(base_url=url, model="m", api_key_env=KEY_ENV).api_key == key


@pytest.mark.parametrize("url", ["ftp://api.example.com/v1", "api.example.com/v1", "https:///v1"])
def test_base_url_must_be_an_http_url(key, url):
    with pytest.raises(ValueError, match="is not an http\\(s\\) URL"):
        OpenAIBackend(base_url=url, model="m", api_key_env=KEY_ENV)


def caption_recipe(url: str, video: str, out, **params) -> dict:
    return {"input": video, "output": str(out), "executor": {"mode": "local"},
            "process": [{"shot_split": {}}, {"vlm_caption": {"backend": "openai", "model": "m", "base_url": url,
                                                             "api_key_env": KEY_ENV, "retries": 0,
                                                             **params}}]}


def test_an_echoed_key_never_reaches_the_rejects_table(echoing, key, tmp_path):
    from bricks.engine.recipe import from_dict
    from bricks.engine.run import run

    from conftest import read_rejects, short_video

    echoing.echo(401)
    video = short_video(tmp_path / "v.mp4")
    manifest = run(from_dict(caption_recipe(echoing.url, video.path, tmp_path / "out")))
    assert manifest["ops"][1]["failed"] == 2 and echoing.chat_hits()
    rejects = read_rejects(tmp_path / "out").to_pylist()
    assert len(rejects) == 2 and key not in str(rejects)
    assert all("HTTP 401: invalid credentials: Bearer [redacted]" in r["reason"] for r in rejects)


def test_recipes_refuse_plain_http_to_other_machines(tmp_path):
    import subprocess
    import sys

    import yaml

    from bricks.engine.recipe import RecipeError, from_dict

    url = "http://10.0.0.7:8000/v1"
    with pytest.raises(RecipeError) as err:
        from_dict(caption_recipe(url, "videos/", tmp_path / "out"), where="r.yaml")
    assert str(err.value).startswith("r.yaml: process[1] vlm_caption: ") and "\n" not in str(err.value)
    assert f"base_url {url} is plain http to another machine" in str(err.value)
    from_dict(caption_recipe(url, "videos/", tmp_path / "out", allow_insecure_http=True))
    from_dict(caption_recipe("http://127.0.0.1:8000/v1", "videos/", tmp_path / "out"))
    # Only the openai backend sends a key.
    from_dict(caption_recipe(url, "videos/", tmp_path / "out", backend="transformers"))

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(caption_recipe(url, str(tmp_path), tmp_path / "out")))
    proc = subprocess.run([sys.executable, "-m", "bricks.engine.cli", "validate", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "allow_insecure_http: true" in proc.stderr


def test_a_caption_that_quotes_the_key_is_redacted(server, key):
    def quote_key(hit: int, body: dict) -> Reply:
        return 200, {}, completion(f"A figure holding a sign saying {key}."), 0.0

    server.chat = quote_key
    client, _ = backend(server.url)
    assert client.generate([caption_request()]) == ["A figure holding a sign saying [redacted]."]
