"""A tiny random-init Qwen2-VL and its processor, built from a config: tests and the demo only.

Nothing is downloaded: the tokenizer is a word-level vocabulary made here, the weights are
seeded random numbers, so its captions are strings of random words. Its shapes are ones vLLM's
CPU backend accepts (attention heads of 32, the vision tower's output as wide as the text
model), so the same model runs on the transformers and the vllm backends.

vLLM loads models from a folder: `tiny_vlm_folder()` writes the model and its processor once
into a cache folder (`$BRICKS_CACHE_DIR`, else `$XDG_CACHE_HOME/bricks` or `~/.cache/bricks`)
and reuses it; `python -m bricks.operators.vlm_backends.tiny DIR` writes them to DIR, e.g. for
`vllm serve DIR`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Words the tiny model can say: bricks-film words, the chat roles, and the words of the flags.
WORDS = ("a the brick bricks red blue yellow green scene moves walks small world bright dark "
         "figure table wall street car house tree sky light camera turns slowly quickly "
         "user assistant No movement Not enough information Single image").split()
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
VOCAB = {token: i for i, token in enumerate(SPECIALS + WORDS + ["<unk>"])}

# Our own minimal chat format: images first, then the text, then the assistant's turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {% for c in m['content'] %}"
    "{% if c['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)

HIDDEN = 64  # text width; the vision merger's output must be as wide
HEADS = 2  # head size 32: vLLM's CPU attention takes no smaller
# Bumped whenever the model or its processor changes, so cached folders are not reused.
FORMAT = "3"
# Weights drawn wide (std 0.5, not transformers' 0.02), so that the answer follows the images and
# their order: at 0.02 attention is nearly uniform, and most clips get the same answer, in
# either order of their frames.
INIT_STD = 0.5


def build_tiny_vlm(seed: int = 0):
    """(model, processor): a 2-layer, 64-wide Qwen2-VL that reads up to a few small images."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    word_level = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.decoder = decoders.WordPiece()  # words joined by spaces, also when decoded a token at a time
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<|im_end|>", additional_special_tokens=SPECIALS[1:])
    tokenizer.padding_side = "left"  # generation appends on the right
    # 4 to 256 merged patches (tokens) an image: up to 448x448 pixels, so that the prompt's
    # length follows the frame size (a 320x180 frame is 66 tokens, a 640x360 one about 250).
    images = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 256)
    processor = Qwen2VLProcessor(image_processor=images, tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    end = VOCAB["<|im_end|>"]
    head_dim = HIDDEN // HEADS
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(VOCAB), hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=1, max_position_embeddings=4096,
                         bos_token_id=VOCAB["<|im_start|>"], eos_token_id=end, pad_token_id=0,
                         initializer_range=INIT_STD, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [4, 6, 6]}),  # sums to head_dim / 2
        vision_config=dict(depth=1, embed_dim=HIDDEN, hidden_size=HIDDEN, num_heads=HEADS, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3, initializer_range=INIT_STD),
        image_token_id=VOCAB["<|image_pad|>"], video_token_id=VOCAB["<|video_pad|>"],
        vision_start_token_id=VOCAB["<|vision_start|>"], vision_end_token_id=VOCAB["<|vision_end|>"],
        bos_token_id=VOCAB["<|im_start|>"], eos_token_id=end, pad_token_id=0, initializer_range=INIT_STD,
    )
    assert sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = end
    return model.eval(), processor


def save_model_folder(model, processor, folder: Path) -> Path:
    """Save `model` and `processor` to `folder` atomically: written beside it, then renamed into
    place, so a reader never sees half a folder. A folder already there is left as it is (the
    same model written by another process first)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".bricks-tmp", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        try:
            os.rename(staging, folder)
        except OSError:
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def write_tiny_vlm(folder: Path, seed: int = 0) -> Path:
    """The tiny model of `seed` and its processor, saved to `folder` (which must not exist yet)."""
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} already exists: give a new folder for the tiny model")
    return save_model_folder(*build_tiny_vlm(seed), folder)


def cache_dir() -> Path:
    root = os.environ.get("BRICKS_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "bricks"


def tiny_vlm_folder(seed: int = 0) -> Path:
    """The cached folder of the tiny model of `seed`, written on first use. Its name depends on
    the seed, this module's FORMAT and the transformers version (whose files it holds)."""
    import transformers

    key = hashlib.sha256(f"{FORMAT}:{seed}:{transformers.__version__}".encode()).hexdigest()[:12]
    folder = cache_dir() / f"tiny-qwen2-vl-{key}"
    if not (folder / "config.json").is_file():
        save_model_folder(*build_tiny_vlm(seed), folder)
    return folder


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bricks.operators.vlm_backends.tiny DIR  (writes the tiny random-init "
              "Qwen2-VL and its processor to DIR)", file=sys.stderr)
        return 2
    try:
        folder = write_tiny_vlm(Path(argv[0]))
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote the tiny random-init Qwen2-VL (tests only: its outputs mean nothing) to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
