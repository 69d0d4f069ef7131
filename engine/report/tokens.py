"""Caption lengths in the T5 tokens the trainer pads or cuts captions to (`model_max_length`).

Only the tokenizer the trainer would load is used: a local folder or a repo id already in the
Hugging Face cache (never downloaded), or the tiny preset's byte-level one. When it cannot be
loaded the report says why instead of counting with some other tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MAX_LENGTH = 200  # Open-Sora 1.1's model_max_length


@dataclass
class TokenCounts:
    tokenizer: str  # what was asked for: "tiny", a folder or a repo id
    max_length: int
    lengths: list[int] = field(default_factory=list)
    missing: str | None = None  # why there are no counts

    @property
    def cut(self) -> int:
        return sum(n > self.max_length for n in self.lengths)


def count_tokens(texts: list[str], ref: str | None, max_length: int = DEFAULT_MAX_LENGTH) -> TokenCounts:
    """Token counts (end-of-text token included, as the trainer's padding counts it) of `texts`."""
    if not texts:  # nothing to count: no tokenizer loaded
        return TokenCounts(ref or "DeepFloyd/t5-v1_1-xxl", max_length)
    try:
        from bricks.model.text_encoder import DEFAULT_T5
    except ImportError as exc:
        return TokenCounts(ref or "DeepFloyd/t5-v1_1-xxl", max_length,
                           missing=f"needs the models extra ({exc.name} is not installed): pip install 'bricks[models]'")
    ref = ref or DEFAULT_T5
    counts = TokenCounts(ref, max_length)
    try:
        tokenizer = _tokenizer(ref)
    except ImportError as exc:
        counts.missing = f"needs the models extra ({exc.name} is not installed): pip install 'bricks[models]'"
        return counts
    except Exception as exc:  # MissingModelError, or a folder transformers cannot read
        counts.missing = str(exc).splitlines()[0]
        return counts
    counts.lengths = [len(ids) for ids in tokenizer(list(texts))["input_ids"]]
    return counts


def _tokenizer(ref: str):
    if ref == "tiny":
        from bricks.model.text_encoder import T5TextEncoder

        return T5TextEncoder.tiny().tokenizer
    from transformers import AutoTokenizer

    from bricks.model.hub import locate
    from bricks.model.text_encoder import T5_FILES

    folder = locate(ref, "T5 tokenizer", [T5_FILES[1]])
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
