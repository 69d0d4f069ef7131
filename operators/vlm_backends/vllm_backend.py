"""Captions with vLLM's in-process engine: one engine per actor (a GPU, or several with tensor
parallelism), requests batched by vLLM itself. Needs the `vllm` extra and a CUDA GPU."""

from __future__ import annotations

import base64
from pathlib import Path

from .base import CaptionRequest


class VLLMBackend:
    def __init__(self, model: Path, *, tensor_parallel_size: int, gpu_memory_utilization: float,
                 max_model_len: int, max_images: int, max_new_tokens: int, temperature: float) -> None:
        from vllm import LLM, SamplingParams

        self.llm = LLM(model=str(model), tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       limit_mm_per_prompt={"image": max_images})
        self.sampling = SamplingParams(max_tokens=max_new_tokens, temperature=temperature)

    def generate(self, requests: list[CaptionRequest]) -> list[str]:
        conversations = []
        for req in requests:
            content = [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,"
                                                                  + base64.b64encode(jpeg).decode()}}
                       for jpeg in req.images]
            content.append({"type": "text", "text": req.prompt})
            conversations.append([{"role": "user", "content": content}])
        outputs = self.llm.chat(conversations, self.sampling, use_tqdm=False)
        return [out.outputs[0].text for out in outputs]
