"""STDiT2, the spatial-temporal diffusion transformer of Open-Sora 1.1, loading its weights as published.

Same config keywords and defaults, same `forward` signature, same state-dict keys and shapes
as `OpenSora-STDiT-v2-stage3`, and the same function of the weights (checked against the
original in `tests/test_stdit2.py`). Each block: spatial self-attention over a frame's
patches, temporal self-attention over a patch's frames (RoPE on q and k), cross-attention
to the caption, MLP; the three self-updates are adaLN-modulated by the timestep.

Shapes: x [B, C, T, H, W] latents; y [B, 1, L, 4096] T5 states; mask [B, L] (1 = token);
x_mask [B, T] (True = frame to generate, False = conditioning frame, which sees t = 0).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .hub import locate, looks_like_repo_id
from .layers import (
    CaptionEmbedder,
    CrossAttention,
    FinalLayer,
    Mlp,
    PatchEmbed3D,
    RotaryEmbedding,
    SelfAttention,
    SizeEmbedder,
    TimestepEmbedder,
    modulate,
    position_embedding_2d,
    select_frames,
)

log = logging.getLogger("bricks")


@dataclass
class STDiT2Config:
    input_size: tuple = (None, None, None)
    input_sq_size: int = 32
    """Reference side (in pixels of the video) at which position embeddings are unscaled."""
    in_channels: int = 4
    patch_size: tuple = (1, 2, 2)
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    pred_sigma: bool = True
    drop_path: float = 0.0
    no_temporal_pos_emb: bool = False
    caption_channels: int = 4096
    model_max_length: int = 120
    freeze: str | None = None
    """None, "not_temporal" (train temporal attention only) or "text" (freeze cross-attention)."""
    qk_norm: bool = False
    enable_flash_attn: bool = False
    """Accepted for compatibility: attention always goes through SDPA, which picks flash kernels."""
    enable_layernorm_kernel: bool = False
    """Accepted for compatibility; plain LayerNorm is used."""
    qk_norm_legacy: bool = True
    """Open-Sora 1.1's order (RoPE, then QK-norm) in temporal attention; False normalises first,
    the order to use when training from scratch."""
    grad_checkpointing: bool = False
    extra: dict = field(default_factory=dict, repr=False)  # unknown keys of a loaded config, kept

    def __post_init__(self) -> None:
        self.patch_size = tuple(self.patch_size)
        self.input_size = tuple(self.input_size)
        if self.freeze not in (None, "not_temporal", "text"):
            raise ValueError(f"freeze must be None, 'not_temporal' or 'text', got {self.freeze!r}")
        if self.hidden_size % 3 or self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must divide by 3 and by num_heads ({self.num_heads})")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "STDiT2Config":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **data, "model_type": "STDiT2", "architectures": ["STDiT2"]}


class STDiT2Block(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, rope: RotaryEmbedding,
                 qk_norm: bool, qk_norm_legacy: bool, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm=qk_norm)
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.norm_temp = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn_temp = SelfAttention(hidden_size, num_heads, qk_norm=qk_norm, rope=rope, qk_norm_legacy=qk_norm_legacy)
        self.scale_shift_table_temporal = nn.Parameter(torch.randn(3, hidden_size) / hidden_size**0.5)
        self.drop_path = drop_path

    def _residual(self, x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop_path > 0:  # stochastic depth, per sample
            keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= self.drop_path
            update = update * keep / (1 - self.drop_path)
        return x + update

    def forward(self, x, y, y_mask, t, t_tmp, x_mask=None, t0=None, t0_tmp=None, T=None, S=None):
        # x: (B, T*S, C); t: (B, 6C); t_tmp: (B, 3C)
        B, _, C = x.shape
        mods = (self.scale_shift_table[None] + t.view(B, 6, C)).chunk(6, dim=1)
        mods_tmp = (self.scale_shift_table_temporal[None] + t_tmp.view(B, 3, C)).chunk(3, dim=1)
        if x_mask is not None:
            mods0 = (self.scale_shift_table[None] + t0.view(B, 6, C)).chunk(6, dim=1)
            mods0_tmp = (self.scale_shift_table_temporal[None] + t0_tmp.view(B, 3, C)).chunk(3, dim=1)

        def modulated(norm: nn.Module, shift: int, scale: int, tmp: bool = False) -> torch.Tensor:
            table, table0 = (mods_tmp, mods0_tmp if x_mask is not None else None) if tmp else \
                (mods, mods0 if x_mask is not None else None)
            normed = norm(x)
            out = modulate(normed, table[shift], table[scale])
            if x_mask is not None:
                out = select_frames(x_mask, out, modulate(normed, table0[shift], table0[scale]), T, S)
            return out

        def gated(update: torch.Tensor, gate: int, tmp: bool = False) -> torch.Tensor:
            table = mods_tmp if tmp else mods
            out = table[gate] * update
            if x_mask is not None:
                table0 = mods0_tmp if tmp else mods0
                out = select_frames(x_mask, out, table0[gate] * update, T, S)
            return out

        # 1. spatial attention over each frame's S patches
        h = modulated(self.norm1, 0, 1).reshape(B * T, S, C)
        h = self.attn(h).reshape(B, T * S, C)
        x = self._residual(x, gated(h, 2))
        # 2. temporal attention over each patch's T frames
        h = modulated(self.norm_temp, 0, 1, tmp=True).view(B, T, S, C).transpose(1, 2).reshape(B * S, T, C)
        h = self.attn_temp(h).view(B, S, T, C).transpose(1, 2).reshape(B, T * S, C)
        x = self._residual(x, gated(h, 2, tmp=True))
        # 3. cross-attention to the caption
        x = x + self.cross_attn(x, y, y_mask)
        # 4. MLP
        x = self._residual(x, gated(self.mlp(modulated(self.norm2, 3, 4)), 5))
        return x


class STDiT2(nn.Module):
    def __init__(self, config: STDiT2Config | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.config = config = config if config is not None else STDiT2Config(**kwargs)
        C = config.hidden_size
        self.out_channels = config.in_channels * 2 if config.pred_sigma else config.in_channels
        self.x_embedder = PatchEmbed3D(config.patch_size, config.in_channels, C)
        self.t_embedder = TimestepEmbedder(C)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.t_block_temp = nn.Sequential(nn.SiLU(), nn.Linear(C, 3 * C))
        self.y_embedder = CaptionEmbedder(config.caption_channels, C, config.class_dropout_prob, config.model_max_length)
        self.rope = RotaryEmbedding(C // config.num_heads)
        # Stochastic depth grows linearly with depth (plain floats: the model may be on "meta").
        rates = [config.drop_path * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList([
            STDiT2Block(C, config.num_heads, config.mlp_ratio, self.rope, config.qk_norm, config.qk_norm_legacy, rate)
            for rate in rates
        ])
        patch_volume = config.patch_size[0] * config.patch_size[1] * config.patch_size[2]
        self.final_layer = FinalLayer(C, patch_volume, self.out_channels)
        self.csize_embedder = SizeEmbedder(C // 3)
        self.ar_embedder = SizeEmbedder(C // 3)
        self.fl_embedder = SizeEmbedder(C)
        self.fps_embedder = SizeEmbedder(C)
        self.initialize_weights()
        self.apply_freeze()

    # --- weights ---------------------------------------------------------------------------

    def initialize_weights(self) -> None:
        """Open-Sora's initialisation, for training from scratch."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1], self.t_block_temp[1],
                       self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2):
            nn.init.normal_(linear.weight, std=0.02)
        for block in self.blocks:  # new branches start as the identity
            for linear in (block.cross_attn.proj, block.attn_temp.proj):
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def apply_freeze(self) -> None:
        if self.config.freeze == "not_temporal":
            for name, p in self.named_parameters():
                p.requires_grad_("attn_temp" in name)
        elif self.config.freeze == "text":
            for name, p in self.named_parameters():
                if "cross_attn" in name:
                    p.requires_grad_(False)
        self.rope.freqs.requires_grad_(False)

    # --- forward ---------------------------------------------------------------------------

    def forward(self, x, timestep, y, mask=None, x_mask=None, num_frames=None, height=None, width=None,
                ar=None, fps=None):
        for name, value in (("num_frames", num_frames), ("height", height), ("width", width), ("ar", ar), ("fps", fps)):
            if value is None:
                raise ValueError(f"STDiT2.forward needs `{name}` (a tensor of shape [B])")
        if x.ndim != 5:
            raise ValueError(f"x must be [B, C, T, H, W], got shape {tuple(x.shape)}")
        B = x.shape[0]
        dtype = self.x_embedder.proj.weight.dtype
        x, timestep, y = x.to(dtype), timestep.to(dtype), y.to(dtype)

        # 1. conditioning: size, aspect ratio, frames, fps
        hw = torch.stack([height, width], dim=1)
        data_info = torch.cat([self.csize_embedder(hw, B), self.ar_embedder(ar[:, None], B)], dim=1)  # (B, C)
        fl = self.fl_embedder(num_frames[:, None], B) + self.fps_embedder(fps[:, None], B)  # (B, C)

        # 2. patches plus 2D position, scaled by resolution
        _, _, Tx, Hx, Wx = x.shape
        pt, ph, pw = self.config.patch_size
        T, H, W = -(-Tx // pt), -(-Hx // ph), -(-Wx // pw)
        S = H * W
        rs = (height[0].item() * width[0].item()) ** 0.5
        pos = position_embedding_2d(self.config.hidden_size, H, W, scale=rs / self.config.input_sq_size,
                                    base_size=round(S**0.5), device=x.device).to(x.dtype)
        x = self.x_embedder(x)  # (B, T*S, C)
        x = (x.view(B, T, S, -1) + pos[:, None]).view(B, T * S, -1)

        # 3. timestep modulations (and those of t = 0 for conditioning frames)
        t = self.t_embedder(timestep)
        t_spc, t_tmp = t + data_info, t + fl
        t_mlp, t_tmp_mlp = self.t_block(t_spc), self.t_block_temp(t_tmp)
        t0_spc = t0_mlp = t0_tmp_mlp = None
        if x_mask is not None:
            t0 = self.t_embedder(torch.zeros_like(timestep))
            t0_spc = t0 + data_info
            t0_mlp, t0_tmp_mlp = self.t_block(t0_spc), self.t_block_temp(t0 + fl)

        # 4. caption tokens (padding masked in cross-attention)
        y = self.y_embedder(y, self.training).squeeze(1)  # (B, L, C)
        if mask is not None:
            if mask.shape[0] != B:
                mask = mask.repeat(B // mask.shape[0], 1)
            mask = mask.view(B, -1) != 0

        # 5. blocks
        for block in self.blocks:
            args = (x, y, mask, t_mlp, t_tmp_mlp, x_mask, t0_mlp, t0_tmp_mlp, T, S)
            if self.config.grad_checkpointing and self.training:
                x = checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)

        # 6. output: Open-Sora modulates the final layer by t itself (and t = 0 plus size info)
        x = self.final_layer(x, t, x_mask, t0_spc, T, S)  # (B, T*S, patch * C_out)
        return self.unpatchify(x, T, H, W, Tx, Hx, Wx).float()

    def unpatchify(self, x, T, H, W, Tx, Hx, Wx):
        pt, ph, pw = self.config.patch_size
        B = x.shape[0]
        x = x.view(B, T, H, W, pt, ph, pw, self.out_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, self.out_channels, T * pt, H * ph, W * pw)
        if (Tx, Hx, Wx) == tuple(x.shape[2:]):
            return x
        # A copy, not a view: FSDP2 cannot follow in-place ops on a view that a module returns.
        return x[:, :, :Tx, :Hx, :Wx].contiguous()

    # --- loading and saving ----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, config: STDiT2Config | dict | None = None,
                        strict: bool = True, **overrides: Any) -> "STDiT2":
        """A Hugging Face folder (config.json + model.safetensors), or a bare .safetensors /
        .pt / .pth state dict with `config` given, or a repo id already in the Hugging Face
        cache (never downloaded). Missing or unexpected keys are reported (an error when
        `strict`); a shape mismatch is an error naming the key."""
        path = Path(path)
        if not path.exists() and looks_like_repo_id(str(path)):
            path = locate(str(path), "STDiT2", [("config.json",), ("model.safetensors",)])
        if path.is_dir():
            config_file = path / "config.json"
            if config is None:
                if not config_file.is_file():
                    raise FileNotFoundError(f"{path}: no config.json (give `config` for a bare state dict)")
                config = json.loads(config_file.read_text())
            weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin", "model.pt")
                            if (path / n).is_file()), None)
            if weights is None:
                raise FileNotFoundError(f"{path}: no model.safetensors (or pytorch_model.bin)")
        else:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file or folder")
            if config is None:
                raise ValueError(f"{path}: a bare state dict needs `config`")
            weights = path
        if isinstance(config, dict):
            config = STDiT2Config.from_dict(config)
        config = dataclasses.replace(config, **overrides) if overrides else config
        model = cls(config)
        model.load_weights(load_state_dict(weights), strict=strict)
        return model

    def load_weights(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        state = {k.removeprefix("module."): v for k, v in state.items()}
        state.pop("pos_embed", None)  # early checkpoints stored a fixed position table
        expected = self.state_dict()
        if "y_embedder.y_embedding" in state:
            state["y_embedder.y_embedding"] = resize_null_caption(state["y_embedder.y_embedding"],
                                                                  self.config.model_max_length)
        for key, value in state.items():
            if key in expected and expected[key].shape != value.shape:
                raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} != model shape "
                                 f"{tuple(expected[key].shape)}")
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            message = f"missing keys: {missing[:8]}{'...' if len(missing) > 8 else ''}; " \
                      f"unexpected keys: {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
            if strict:
                raise KeyError(message)
            log.warning("STDiT2 weights: %s", message)
        self.load_state_dict(state, strict=False)

    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / ".model.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp))
        tmp.replace(path / "model.safetensors")
        (path / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("ema", "model", "state_dict"):  # training checkpoints nest the weights
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def resize_null_caption(embedding: torch.Tensor, length: int) -> torch.Tensor:
    """Fit the stored null caption to `length` tokens: cut it, or repeat its last token, as
    Open-Sora does when a checkpoint meets another T5 length."""
    if embedding.shape[0] > length:
        return embedding[:length]
    if embedding.shape[0] < length:
        extra = embedding[-1:].repeat(length - embedding.shape[0], 1)
        return torch.cat([embedding, extra], dim=0)
    return embedding
