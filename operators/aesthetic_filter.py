"""`aesthetic_filter`: the LAION aesthetic predictor on CLIP ViT-L/14 image embeddings.

Frames of each clip (or the image) are embedded with CLIP (open_clip), L2-normalised, and
scored by the LAION MLP (`sac+logos+ava1-l14-linearMSE`), about 1-10; the clip's score is
the mean or minimum over its frames, stored in `aes`. Text2Bricks kept clips from 5.0.

torch and open_clip are imported only where the model runs, so the engine installs and
plans recipes without them (extra `models`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from bricks.common.weights import ModelFile, resolve
from bricks.engine.operator import FrameRequest, ModelOperator, ModelParams, check_ordered
from bricks.engine.registry import register

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


class AestheticParams(ModelParams):
    preset: Literal["laion", "tiny"] = "laion"
    """`tiny`: a random-init CLIP and MLP for tests and the demo; scores mean nothing."""
    num_frames: int = Field(default=3, ge=1)
    """Frames per clip, evenly spread (1/6, 1/2, 5/6 of the clip for 3)."""
    reduction: Literal["mean", "min"] = "mean"
    min_score: float = Field(default=5.0, ge=0)
    max_score: float | None = Field(default=None, ge=0)
    clip_model: str = "ViT-L-14-quickgelu"
    clip_repo: str = "timm/vit_large_patch14_clip_224.openai"
    clip_file: str = "open_clip_model.safetensors"
    clip_weights: str | None = None
    """A local CLIP weights file; otherwise BRICKS_MODEL_DIR/clip_repo/clip_file or the HF cache."""
    mlp_repo: str = "camenduru/improved-aesthetic-predictor"
    mlp_file: str = "sac+logos+ava1-l14-linearMSE.pth"
    mlp_weights: str | None = None

    @model_validator(mode="after")
    def _ordered(self):
        return check_ordered(self, ("min_score", "max_score"))


@register
class AestheticFilter(ModelOperator):
    name = "aesthetic_filter"
    description = "LAION aesthetic score (CLIP ViT-L/14 + MLP) of frames per clip, in `aes`; keep min..max."
    Params = AestheticParams
    outputs = {"aes": pa.float64()}
    thresholds = ("min_score", "max_score")

    @property
    def image_size(self) -> int:
        return 32 if self.params.preset == "tiny" else 224

    def frame_requests(self):
        n = self.params.num_frames
        return (FrameRequest("fractions", fractions=tuple((k + 0.5) / n for k in range(n)),
                             short_side=self.image_size),)

    def model_files(self) -> list[ModelFile]:
        if self.params.preset == "tiny":
            return []
        p = self.params
        return [ModelFile(p.clip_repo, p.clip_file, p.clip_weights), ModelFile(p.mlp_repo, p.mlp_file, p.mlp_weights)]

    def required_modules(self) -> tuple[str, ...]:
        return ("torch", "open_clip")

    def load(self, device: str) -> None:
        import torch

        if self.params.preset == "tiny":
            clip, mlp = tiny_models()
        else:
            import open_clip

            clip_path, mlp_path = (resolve(f) for f in self.model_files())
            clip = open_clip.create_model(self.params.clip_model, pretrained=str(clip_path))
            mlp = AestheticMLP()
            mlp.load_state_dict(torch.load(mlp_path, map_location="cpu", weights_only=True))
        self.device = device
        self.model = (clip.visual.to(device).eval(), mlp.to(device).eval())

    def preprocess(self, sample, frames) -> np.ndarray:
        """Centre crop to the model's square input and normalise: (n, 3, S, S) float32."""
        size = self.image_size
        crops = []
        for frame in frames[0].arrays:
            h, w = frame.shape[:2]
            top, left = (h - size) // 2, (w - size) // 2
            crop = frame[max(top, 0):max(top, 0) + size, max(left, 0):max(left, 0) + size]
            if crop.shape[:2] != (size, size):  # smaller than the input: pad rather than stretch
                crop = np.pad(crop, ((0, size - crop.shape[0]), (0, size - crop.shape[1]), (0, 0)))
            crops.append(((crop.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1))
        return np.stack(crops)

    def infer(self, inputs: list[np.ndarray]) -> list[float]:
        import torch

        visual, mlp = self.model
        counts = [len(x) for x in inputs]
        with torch.inference_mode():
            pixels = torch.from_numpy(np.concatenate(inputs)).to(self.device)
            embeddings = visual(pixels).float()
            embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
            scores = mlp(embeddings).squeeze(-1).cpu().numpy()
        reduce = np.mean if self.params.reduction == "mean" else np.min
        out, start = [], 0
        for n in counts:
            out.append(float(reduce(scores[start:start + n])))
            start += n
        return out

    def apply(self, sample, output: float) -> dict:
        return {"aes": output}

    def keep(self, fields):
        p, score = self.params, fields["aes"]
        if score < p.min_score:
            return f"aes {score:.2f} < min_score {p.min_score:g}"
        if p.max_score is not None and score > p.max_score:
            return f"aes {score:.2f} > max_score {p.max_score:g}"
        return True


def AestheticMLP():
    """The LAION predictor's head: 768 -> 1024 -> 128 -> 64 -> 16 -> 1 (keys layers.{0,2,4,6,7})."""
    from torch import nn

    class _MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(
                nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
            )

        def forward(self, x):
            return self.layers(x)

    return _MLP()


def tiny_models():
    """A CLIP with a 32 px, 2-layer vision tower and a random MLP, seeded: tests and demo only."""
    import torch
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    clip = CLIP(embed_dim=768,
                vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32),
                text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1))
    return clip, AestheticMLP()
