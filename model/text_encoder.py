"""The T5 text encoder that conditions STDiT2 (`DeepFloyd/t5-v1_1-xxl`, 4096-d states).

Captions are tokenised, padded (or cut) to `model_max_length` tokens and encoded; STDiT2
gets the states as y [B, 1, L, D] and the padding as mask [B, L] (1 = token, 0 = padding).
bf16 on GPU, float32 on CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .hub import locate

log = logging.getLogger("bricks")

DEFAULT_T5 = "DeepFloyd/t5-v1_1-xxl"
T5_FILES = [
    ("config.json",),
    ("spiece.model", "tokenizer.json"),
    ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"),
]


def default_dtype(device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class T5TextEncoder:
    """Tokenizer plus T5 encoder, inference only (the trainer never trains it)."""

    def __init__(self, tokenizer, model, model_max_length: int = 200) -> None:
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.model_max_length = model_max_length
        self.output_dim = model.config.d_model

    @classmethod
    def from_pretrained(cls, ref: str | Path = DEFAULT_T5, model_max_length: int = 200,
                        device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> "T5TextEncoder":
        """A local folder with the tokenizer and encoder weights, or a repo id already in the
        Hugging Face cache. Never downloads."""
        from transformers import AutoTokenizer, T5EncoderModel

        folder = locate(ref, "T5 text encoder", T5_FILES)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        # torch_dtype: transformers < 4.56 (ColossalAI's pin) has no `dtype`; 5.x takes both
        model = T5EncoderModel.from_pretrained(str(folder), local_files_only=True,
                                               torch_dtype=dtype or default_dtype(device))
        return cls(tokenizer, model.to(device), model_max_length)

    @classmethod
    def tiny(cls, model_max_length: int = 16, d_model: int = 32, seed: int = 0) -> "T5TextEncoder":
        """A 2-layer, `d_model`-wide random-init T5 encoder with a byte-level tokenizer made
        here (nothing downloaded): for tests and the demo only."""
        from tokenizers import Tokenizer, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

        from bricks.common.weights import warn_tiny

        warn_tiny("T5 text encoder")
        specials = ["<pad>", "</s>", "<unk>"]  # T5's ids: pad 0, end of text 1
        # sorted: alphabet() comes from a Rust hash set, in another order in every process
        vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
        byte_level = Tokenizer(models.BPE(vocab, merges=[], unk_token="<unk>"))
        byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        byte_level.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_level, pad_token="<pad>", eos_token="</s>",
                                            unk_token="<unk>")
        config = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                          num_heads=4, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1)
        torch.manual_seed(seed)
        return cls(tokenizer, T5EncoderModel(config), model_max_length)

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "T5TextEncoder":
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """{"y": [B, 1, L, D] states, "mask": [B, L] long} for L = model_max_length."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of captions, not one string")
        step = batch_size or max(len(texts), 1)
        states, masks = [], []
        for i in range(0, len(texts), step):
            tokens = self.tokenizer(list(texts[i:i + step]), max_length=self.model_max_length, padding="max_length",
                                    truncation=True, return_attention_mask=True, return_tensors="pt")
            ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
            states.append(self.model(input_ids=ids, attention_mask=mask).last_hidden_state)
            masks.append(mask)
        return {"y": torch.cat(states)[:, None], "mask": torch.cat(masks)}
