"""`vlm_caption`: captions from a vision-language model, as the Text2Bricks data was captioned.

A clip is shown as three frames at 20%, 50% and 80% of its length, in order; an image sample
as itself. The instruction asks for a description useful to regenerate the scene; three
fixed answers flag unusable samples, which are dropped with that reason: `Not enough
information`, `Single image` and `No movement`; so is an empty answer. Other answers go to `text`, cleaned of
wrapping quotes and label prefixes.

Backends (`backend`): `vllm` (in-process engine per actor), `transformers` (any Hugging Face
vision-language model, CPU or GPU) and `openai` (any OpenAI-compatible endpoint).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import cv2
from pydantic import AliasChoices, Field, model_validator

from bricks.common.weights import ModelFile, resolve
from bricks.engine.operator import FatalModelError, FrameRequest, ModelOperator, ModelParams
from bricks.engine.registry import register

from .vlm_backends.base import CaptionRequest

FLAGS = ("Not enough information", "Single image", "No movement")

VIDEO_PROMPT = (
    "These three pictures come, in order, from one short clip. Describe the clip as a single "
    "continuous scene, in a way that would let an artist recreate it: the place, the characters "
    "and objects, what they do and how they move, the colours, the light and how the camera "
    "frames them. Write plain prose of at most five sentences. Do not go through the pictures one "
    "by one, and never use the words video, image, frame, picture, lego or stop motion, nor say "
    "that the world is made of blocks. If the pictures show too little to tell what is going "
    "on, answer only: Not enough information. If the three pictures are the same, answer only: "
    "Single image. If hardly anything moves between them, answer only: No movement."
)

IMAGE_PROMPT = (
    "Describe this picture in a way that would let an artist recreate it: the place, the "
    "characters and objects, what they are doing, the colours, the light and the framing. "
    "Write plain prose of at most five sentences. Never use the words video, image, frame, "
    "picture, lego or stop motion, nor say that the world is made of blocks. If the picture "
    "shows too little to tell what it is, answer only: Not enough information."
)

_PREFIX = re.compile(r"^\s*(caption|description|answer|scene)\s*:\s*", re.IGNORECASE)
_QUOTES = "\"'“”‘’`"


class VlmCaptionParams(ModelParams):
    backend: Literal["vllm", "transformers", "openai"] = "vllm"
    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    """Hugging Face repository (vllm, transformers), or the endpoint's model name (openai)."""
    model_path: str | None = None
    """A local model folder; otherwise BRICKS_MODEL_DIR/model or the HF cache."""
    preset: Literal["none", "tiny"] = "none"
    """`tiny`: a random-init Qwen2-VL, for tests and the demo: built in memory for the
    transformers backend; for vllm, saved once to a cache folder (`$BRICKS_CACHE_DIR`, else
    `~/.cache/bricks`) that vLLM loads."""
    video_prompt: str = VIDEO_PROMPT
    image_prompt: str = IMAGE_PROMPT
    video_prompt_file: str | None = None
    image_prompt_file: str | None = None
    """Instructions read from a text file instead (relative to the working folder)."""
    short_side: int = Field(default=448, ge=28)
    """Frames are sent at this short side (never enlarged)."""
    jpeg_quality: int = Field(default=90, ge=1, le=100)
    max_new_tokens: int = Field(default=300, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    skip_existing: bool = False
    """Keep a caption a sample already has (from a data-set file given as input) and caption
    only the others: those are not sent to the model."""
    # openai
    base_url: str = Field(default="https://api.openai.com/v1", validation_alias=AliasChoices("base_url", "api_base"))
    """The endpoint, as the OpenAI client calls it (`api_base`, the older name, is accepted too)."""
    api_key_env: str = "OPENAI_API_KEY"
    """The environment variable holding the API key (never the key itself)."""
    allow_insecure_http: bool = False
    """Send the key over plain http to another machine (it goes only over https or to this
    machine otherwise)."""
    concurrency: int = Field(default=8, ge=1)
    retries: int = Field(default=5, ge=0)
    timeout: float = Field(default=60.0, gt=0)
    # vllm
    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    max_model_len: int = Field(default=8192, ge=256)
    """Prompt (instructions and image tokens) plus answer, in tokens: longer requests fail alone."""
    kv_cache_gb: float | None = Field(default=None, gt=0)
    """vLLM's KV cache per engine, in GiB. Null: 1 GiB on CPU; on a GPU, what
    `gpu_memory_utilization` leaves after the weights."""
    enforce_eager: bool = False
    """Run vLLM without torch.compile: the engine starts about twice as fast, steps run slower."""

    @model_validator(mode="before")
    @classmethod
    def _one_endpoint_name(cls, data):
        if isinstance(data, dict) and "base_url" in data and "api_base" in data:
            raise ValueError("give the endpoint once: base_url (api_base is its older name)")
        return data

    @model_validator(mode="after")
    def _prompt_files_exist(self):
        for name in ("video_prompt_file", "image_prompt_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: {path} is not a file")
        return self

    @model_validator(mode="after")
    def _key_goes_over_https(self):
        if self.backend == "openai":
            from .vlm_backends.openai_backend import transport_problem

            # A key is always sent to another machine (the backend refuses to go without one).
            problem = transport_problem(self.base_url, self.allow_insecure_http)
            if problem:
                raise ValueError(problem)
        return self


@register
class VlmCaption(ModelOperator):
    name = "vlm_caption"
    description = "Caption clips (frames at 20/50/80%) and images with a VLM; drop flagged samples."
    Params = VlmCaptionParams

    def frame_requests(self):
        return (FrameRequest("fractions", fractions=(0.2, 0.5, 0.8), short_side=self.params.short_side),)

    def applies_to(self, sample) -> bool:
        return not (self.params.skip_existing and sample.get("text"))

    @property
    def prompts(self) -> dict[str, str]:
        p = self.params
        video = Path(p.video_prompt_file).read_text().strip() if p.video_prompt_file else p.video_prompt
        image = Path(p.image_prompt_file).read_text().strip() if p.image_prompt_file else p.image_prompt
        return {"video": video, "image": image}

    def model_files(self) -> list[ModelFile]:
        p = self.params
        if p.preset == "tiny" or p.backend == "openai":
            return []
        return [ModelFile(p.model, None, p.model_path)]

    @property
    def loads_model_here(self) -> bool:
        return self.params.backend != "openai"

    def required_modules(self) -> tuple[str, ...]:
        p = self.params  # the same choice of backend as `load`
        if p.backend == "openai":
            return ()
        if p.backend == "transformers":
            return ("torch", "transformers")
        return ("vllm",)

    def check(self) -> None:
        if self.params.backend == "openai":
            try:
                self._openai().check()
            except ValueError as exc:  # e.g. the API key variable is not set
                raise FatalModelError(f"{self.name}: {exc}") from None

    def _openai(self):
        from .vlm_backends.openai_backend import OpenAIBackend

        p = self.params
        return OpenAIBackend(base_url=p.base_url, model=p.model, api_key_env=p.api_key_env, concurrency=p.concurrency,
                             retries=p.retries, timeout=p.timeout, max_tokens=p.max_new_tokens,
                             temperature=p.temperature, allow_insecure_http=p.allow_insecure_http)

    def load(self, device: str) -> None:
        p = self.params
        if p.backend == "openai":
            self.model = self._openai()
        elif p.preset == "tiny" and p.backend == "transformers":
            from .vlm_backends.tiny import build_tiny_vlm
            from .vlm_backends.transformers_backend import TransformersBackend

            self.model = TransformersBackend(*build_tiny_vlm(), device, p.max_new_tokens, p.temperature)
        elif p.backend == "transformers":
            from .vlm_backends.transformers_backend import TransformersBackend

            self.model = TransformersBackend.from_folder(resolve(self.model_files()[0]), device, p.max_new_tokens,
                                                         p.temperature)
        else:
            from .vlm_backends.vllm_backend import VLLMBackend

            if p.preset == "tiny":
                from .vlm_backends.tiny import tiny_vlm_folder

                folder = tiny_vlm_folder()
            else:
                folder = resolve(self.model_files()[0])
            self.model = VLLMBackend(folder, device=device, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                                     tensor_parallel_size=p.tensor_parallel_size,
                                     gpu_memory_utilization=p.gpu_memory_utilization, kv_cache_gb=p.kv_cache_gb,
                                     max_model_len=p.max_model_len, max_images=3, enforce_eager=p.enforce_eager)

    def preprocess(self, sample, frames) -> CaptionRequest:
        """JPEG-encode the frames (RGB arrays) on CPU; an image sample is one frame."""
        arrays = frames[0].arrays[:1] if sample["kind"] == "image" else frames[0].arrays
        jpegs = []
        for rgb in arrays:
            ok, data = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, self.params.jpeg_quality])
            if not ok:
                raise RuntimeError("JPEG encoding failed")
            jpegs.append(data.tobytes())
        return CaptionRequest(self.prompts["image" if sample["kind"] == "image" else "video"], jpegs)

    def infer(self, inputs: list[CaptionRequest]) -> list:
        return self.model.generate(inputs)

    def apply(self, sample, output) -> dict:
        if isinstance(output, Exception):  # one request of a concurrent batch failed
            raise output
        return {"text": clean_caption(output)}

    def keep(self, fields):
        if not fields["text"]:  # no caption to train on (the trainer would leave the sample out)
            return "empty caption: the model answered nothing"
        flag = caption_flag(fields["text"])
        return f"caption flag: {flag}" if flag else True


def clean_caption(text: str) -> str:
    text = " ".join(text.split())
    previous = None
    while previous != text:  # `Caption: "..."` and `"Caption: ..."` alike
        previous = text
        text = _PREFIX.sub("", text).strip()
        if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
            text = text[1:-1].strip()
    return text


def caption_flag(text: str) -> str | None:
    """The flag an answer amounts to, compared loosely (case, punctuation, spacing), or None."""
    words = re.sub(r"[^a-z]+", " ", text.lower()).split()
    for flag in FLAGS:
        if words == flag.lower().split():
            return flag
    return None
