"""Captions with any Hugging Face vision-language model through transformers (CPU or GPU)."""

from __future__ import annotations

import io
from pathlib import Path

from .base import CaptionRequest


class TransformersBackend:
    def __init__(self, model, processor, device: str, max_new_tokens: int, temperature: float) -> None:
        self.model = model.to(device)
        self.processor = processor
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature

    @classmethod
    def from_folder(cls, folder: Path, device: str, max_new_tokens: int, temperature: float) -> "TransformersBackend":
        """Load a saved model folder; never reaches the network (`local_files_only`)."""
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        processor.tokenizer.padding_side = "left"  # generation appends on the right
        model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, dtype=dtype)
        return cls(model.eval(), processor, device, max_new_tokens, temperature)

    def generate(self, requests: list[CaptionRequest]) -> list[str]:
        import torch
        from PIL import Image

        texts, images = [], []
        for req in requests:
            content = [{"type": "image"} for _ in req.images] + [{"type": "text", "text": req.prompt}]
            texts.append(self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                            add_generation_prompt=True))
            images.append([Image.open(io.BytesIO(jpeg)).convert("RGB") for jpeg in req.images])
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt").to(self.device)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **sampling)
        answers = out[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(answers, skip_special_tokens=True)
