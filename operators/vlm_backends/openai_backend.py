"""Caption backend for any OpenAI-compatible chat-completions endpoint (GPT-4o, `vllm serve`).

Each request carries the clip's frames (or the still image) as base64 JPEG data URLs, in order,
followed by the prompt text. Requests go out concurrently from a small thread pool; rate limits
(429), server errors (5xx) and timeouts are retried with capped exponential backoff. A request
that still fails comes back as an Exception in its slot, so one bad sample does not sink the
batch; a service that cannot be reached at all raises `EndpointDown`, so the run stops instead of
marking every sample failed.

The API key goes only over https or to this machine (loopback), unless the caller allows plain
http. Whatever an endpoint answers may quote the key back (some echo the Authorization header in
their error bodies): every message built here has the key's value redacted before it is cut
short, so it reaches neither the rejects table, nor an error that stops the run, nor the log.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable
from urllib.parse import urlsplit

import requests
from urllib3.exceptions import ReadTimeoutError

from bricks.operators.vlm_backends.base import CaptionRequest, EndpointDown

__all__ = ["CaptionRequest", "EndpointDown", "OpenAIBackend", "RequestFailed"]

log = logging.getLogger("bricks")

BODY_PREVIEW = 200  # characters of a server's error body quoted in messages
CHECK_TIMEOUT = 10.0  # the preflight should answer fast even when captions are slow
REDACTED = "[redacted]"


class RequestFailed(RuntimeError):
    """One caption request failed for good; returned in its slot, not raised."""


def is_loopback(base_url: str) -> bool:
    """True for `localhost`, 127.0.0.0/8 and ::1: this machine, where a local `vllm serve`
    needs no key and plain http never leaves the host."""
    host = urlsplit(base_url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def transport_problem(base_url: str, allow_insecure_http: bool = False, sends_key: bool = True) -> str | None:
    """Why requests (with an API key, if `sends_key`) must not go to `base_url`, or None."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"base_url {base_url!r} is not an http(s) URL such as https://api.openai.com/v1"
    if sends_key and parts.scheme == "http" and not is_loopback(base_url) and not allow_insecure_http:
        return (f"base_url {base_url} is plain http to another machine: the API key would cross the "
                "network unencrypted; use https, or set allow_insecure_http: true on a network you trust")
    return None


def one_line(text: str, limit: int = BODY_PREVIEW) -> str:
    """The start of a body on one line, for error messages."""
    return " ".join(text[:limit].split())


def retry_after_seconds(response: requests.Response) -> float | None:
    """A numeric Retry-After header in seconds; None when absent or an HTTP date."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return max(seconds, 0.0)


def image_part(jpeg: bytes) -> dict[str, Any]:
    url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
    return {"type": "image_url", "image_url": {"url": url}}


def chat_messages(request: CaptionRequest) -> list[dict[str, Any]]:
    """One user turn: the images in order, then the prompt."""
    content = [image_part(jpeg) for jpeg in request.images]
    content.append({"type": "text", "text": request.prompt})
    return [{"role": "user", "content": content}]


def answer_text(response: requests.Response) -> str | None:
    """`choices[0].message.content`, or None when the body does not have it."""
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def is_retryable(status: int) -> bool:
    return status == 429 or 500 <= status < 600


def is_body_timeout(error: requests.ConnectionError) -> bool:
    """requests reports a read timeout while downloading the body as a ConnectionError."""
    return bool(error.args) and isinstance(error.args[0], ReadTimeoutError)


def connection_reason(error: requests.RequestException) -> str:
    """The root cause of a connection error ("[Errno 111] Connection refused"), uncut: callers
    redact it before they shorten it."""
    reason = getattr(error.args[0], "reason", None) if error.args else None
    text = str(reason if reason is not None else error)
    # urllib3 prefixes the connection object's repr: "HTTPConnection(host=..., port=...): ..."
    if text.startswith(("HTTPConnection(", "HTTPSConnection(")) and "): " in text:
        text = text.split("): ", 1)[1]
    return text


def new_session() -> requests.Session:
    return requests.Session()


class OpenAIBackend:
    """Captions through POST {base_url}/chat/completions."""

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        concurrency: int = 8,
        retries: int = 5,
        timeout: float = 60.0,
        max_tokens: int = 300,
        temperature: float = 0.0,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        allow_insecure_http: bool = False,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if retries < 0:
            raise ValueError(f"retries must be 0 or more, got {retries}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.retries = retries
        self.timeout = timeout
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.sleep: Callable[[float], None] = time.sleep  # tests swap this out to avoid waiting
        self.api_key = self._read_key()
        problem = transport_problem(self.base_url, allow_insecure_http, sends_key=self.api_key is not None)
        if problem:
            raise ValueError(problem)

    def _read_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if key:
            if key != key.strip() or not key.isprintable():  # never quote the key itself
                raise ValueError(f"${self.api_key_env} holds whitespace or control characters: set it to the key alone")
            return key
        if is_loopback(self.base_url):
            return None  # a local server without auth: send no Authorization header
        raise ValueError(
            f"no API key for {self.base_url}: set the environment variable {self.api_key_env}"
        )

    def redact(self, text: str) -> str:
        """`text` without the API key's value."""
        return text.replace(self.api_key, REDACTED) if self.api_key else text

    def _quote(self, text: str, limit: int = BODY_PREVIEW) -> str:
        """The start of a server's answer (or an error's text) on one line, key redacted first
        so that cutting it short cannot leave part of the key behind."""
        return one_line(self.redact(text), limit)

    def _down(self, message: str) -> EndpointDown:
        return EndpointDown(self.redact(message))

    def _failed(self, message: str) -> RequestFailed:
        return RequestFailed(self.redact(message))

    def _unreachable(self, url: str, error: requests.RequestException) -> EndpointDown:
        return self._down(f"cannot reach {url}: {self._quote(connection_reason(error), 300)}")

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _delay(self, attempt: int, response: requests.Response | None = None) -> float:
        """Seconds to wait before retry number `attempt` + 1; the server's Retry-After wins."""
        hinted = retry_after_seconds(response) if response is not None else None
        if hinted is not None:
            return min(hinted, self.max_backoff)
        return min(self.backoff * 2**attempt, self.max_backoff)

    # -- preflight ------------------------------------------------------------------------

    def check(self) -> None:
        """Fail fast, before any work, when the service is unreachable or refuses the key."""
        url = f"{self.base_url}/models"
        limit = min(self.timeout, CHECK_TIMEOUT)
        with requests.Session() as session:
            for attempt in range(self.retries + 1):
                try:
                    response = session.get(url, headers=self._headers(), timeout=(limit, limit))
                except (requests.ConnectionError, requests.Timeout) as error:
                    # `from None` here and below: the original error's text is not redacted.
                    if attempt == self.retries:
                        raise self._unreachable(url, error) from None
                    self.sleep(self._delay(attempt))
                    continue
                except requests.RequestException as error:  # a bad URL or header: no request can succeed
                    raise self._down(f"request to {url} failed: {self._quote(str(error))}") from None
                self._check_auth(url, response)
                return  # any other status (404 without a /models route, even 5xx): the server is up

    def _check_auth(self, url: str, response: requests.Response) -> None:
        if response.status_code not in (401, 403):
            return
        if self.api_key:
            reason = f"the key in ${self.api_key_env} was refused"
        else:
            reason = "it needs an API key" + (f": set ${self.api_key_env}" if self.api_key_env else "")
        raise self._down(f"{url} answered HTTP {response.status_code}: {reason}")

    # -- captions -------------------------------------------------------------------------

    def generate(self, requests: list[CaptionRequest]) -> list[str | Exception]:
        """Captions in input order; a failed request leaves its Exception in its slot.

        Raises EndpointDown when the service cannot be reached after the retries.
        """
        if not requests:
            return []
        stop = threading.Event()  # set when the endpoint is down: the remaining requests skip
        local = threading.local()
        sessions = []
        sessions_lock = threading.Lock()

        def session():
            # requests.Session is not documented as thread-safe: one per worker thread.
            if not hasattr(local, "session"):
                local.session = new_session()
                with sessions_lock:
                    sessions.append(local.session)
            return local.session

        def work(request: CaptionRequest) -> str | Exception:
            if stop.is_set():
                return RequestFailed("skipped: the caption endpoint is down")
            try:
                return self._post(session(), request, stop)
            except EndpointDown:
                stop.set()
                raise
            except Exception as error:  # whatever it was, it stays in its slot and quotes no key
                return self._failed(f"{type(error).__name__}: {self._quote(str(error))}")

        workers = min(self.concurrency, len(requests))
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="openai-caption") as pool:
                futures = [pool.submit(work, request) for request in requests]
                try:
                    return [future.result() for future in futures]
                except EndpointDown:
                    stop.set()
                    for future in futures:
                        future.cancel()
                    raise
        finally:
            for s in sessions:
                s.close()

    def _payload(self, request: CaptionRequest) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": chat_messages(request),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }

    def _post(self, session: requests.Session, request: CaptionRequest, stop: threading.Event) -> str | Exception:
        """One request with retries: the caption, or the Exception that ended it."""
        url = f"{self.base_url}/chat/completions"
        payload = self._payload(request)
        timeout = (min(self.timeout, CHECK_TIMEOUT), self.timeout)
        failure = ""
        for attempt in range(self.retries + 1):
            if attempt and stop.is_set():
                return self._failed(f"gave up after {failure}: the caption endpoint is down")
            response = None
            try:
                response = session.post(url, json=payload, headers=self._headers(), timeout=timeout)
            except requests.ConnectTimeout as error:  # nothing answered the connect: unreachable
                if attempt == self.retries:
                    raise self._unreachable(url, error) from None
                failure = "connect timeout"
            except requests.Timeout:
                failure = f"no answer within {self.timeout:g} s"
            except requests.ConnectionError as error:
                if is_body_timeout(error):
                    failure = f"no answer within {self.timeout:g} s"
                elif attempt == self.retries:
                    raise self._unreachable(url, error) from None
                else:
                    failure = f"connection error: {self._quote(connection_reason(error), 300)}"
            except requests.RequestException as error:  # a bad URL and the like: not worth retrying
                return self._failed(f"request to {url} failed: {self._quote(str(error))}")
            else:
                if 200 <= response.status_code < 300:
                    content = answer_text(response)
                    if content is None:
                        return self._failed(f"malformed response (HTTP {response.status_code}): "
                                            f"{self._quote(response.text)}")
                    return self.redact(content)  # a caption is stored too
                failure = f"HTTP {response.status_code}: {self._quote(response.text)}"
                if not is_retryable(response.status_code):
                    return self._failed(failure)
            if attempt < self.retries:
                delay = self._delay(attempt, response)
                log.debug("caption request: %s; retry %d in %.1f s", failure, attempt + 1, delay)
                self.sleep(delay)
        return self._failed(f"{failure} (after {self.retries} retries)")
