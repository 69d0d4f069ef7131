"""Building blocks of STDiT2: embeddings, attention, modulation. Plain modules, no distributed code.

Each mirrors the arithmetic of Open-Sora 1.1's layer of the same role (so its weights load
and give the same outputs); attention goes through `scaled_dot_product_attention` so GPUs
use flash or memory-efficient kernels without extra packages.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift; shift and scale are (B, 1, C)."""
    return x * (1 + scale) + shift


def select_frames(x_mask: torch.Tensor, x: torch.Tensor, x_cond: torch.Tensor, T: int, S: int) -> torch.Tensor:
    """Per frame, `x` where x_mask is True (frames to generate), else `x_cond`. (B, T*S, C)."""
    B, _, C = x.shape
    keep = x_mask[:, :, None, None]
    return torch.where(keep, x.view(B, T, S, C), x_cond.view(B, T, S, C)).view(B, T * S, C)


def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) scalars to (N, dim) features: cos then sin, frequencies from 1 to 1/max_period."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class RMSNorm(nn.Module):
    """RMS norm over the last dim, computed in float32 (keys: `weight`)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over the sequence dim (-2), pairs of adjacent features
    rotated together; `freqs` is stored (without grad) as in the published weights."""

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.freqs = nn.Parameter(freqs, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., N, D)
        n = x.shape[-2]
        positions = torch.arange(n, device=x.device, dtype=self.freqs.dtype)
        angles = torch.einsum("n,f->nf", positions, self.freqs).repeat_interleave(2, dim=-1)  # (N, D)
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return (x * angles.cos() + rotated * angles.sin()).to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention with optional QK RMS-norm and RoPE (keys: qkv, q_norm, k_norm, proj)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, rope: RotaryEmbedding | None = None,
                 qk_norm_legacy: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        # A callable, not a submodule: the shared RoPE's `freqs` is saved once, at the top.
        self._rope = [rope] if rope is not None else []
        # Open-Sora 1.1 rotates q and k before normalising them (its weights were trained so);
        # the corrected order normalises first.
        self.qk_norm_legacy = qk_norm_legacy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, h, N, d)
        if self._rope and self.qk_norm_legacy:
            q, k = self._rope[0](q), self._rope[0](k)
        q, k = self.q_norm(q), self.k_norm(k)
        if self._rope and not self.qk_norm_legacy:
            q, k = self._rope[0](q), self._rope[0](k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Every token attends to its sample's caption tokens; padding tokens are masked out
    (keys: q_linear, kv_linear, proj)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None) -> torch.Tensor:
        # x: (B, N, C); y: (B, L, C); y_mask: (B, L) True for real tokens
        B, N, C = x.shape
        L = y.shape[1]
        q = self.q_linear(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_linear(y).view(B, L, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn_mask = None if y_mask is None else y_mask[:, None, None, :].bool()
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """fc1 -> GELU (tanh) -> fc2, as the published keys name them."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    """Scalar to vector: 256 sinusoidal features through a 2-layer MLP (keys: mlp.0, mlp.2)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.frequency_size = frequency_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal(t, self.frequency_size).to(self.mlp[0].weight.dtype))


class SizeEmbedder(TimestepEmbedder):
    """(B, D) scalars (height and width, aspect ratio, frames, fps) to (B, D * hidden):
    each scalar embedded like a timestep, the results concatenated."""

    def forward(self, s: torch.Tensor, batch: int) -> torch.Tensor:
        if s.ndim == 1:
            s = s[:, None]
        if s.shape[0] != batch:
            s = s.repeat(batch // s.shape[0], 1)
        B, D = s.shape
        emb = super().forward(s.reshape(-1))
        return emb.view(B, D * emb.shape[-1])


class CaptionEmbedder(nn.Module):
    """T5 states to the model width; `y_embedding` is the null caption that classifier-free
    guidance drops captions to (training dropout with probability `uncond_prob`)."""

    def __init__(self, in_channels: int, hidden_size: int, uncond_prob: float, token_num: int) -> None:
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)
        self.uncond_prob = uncond_prob

    def forward(self, caption: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        # caption: (B, 1, L, C_text)
        if force_drop_ids is not None:
            drop = force_drop_ids == 1
        elif train and self.uncond_prob > 0:
            drop = torch.rand(caption.shape[0], device=caption.device) < self.uncond_prob
        else:
            drop = None
        if drop is not None:
            caption = torch.where(drop[:, None, None, None], self.y_embedding.to(caption.dtype), caption)
        return self.y_proj(caption)


class PatchEmbed3D(nn.Module):
    """Video latents to patch tokens: a Conv3d with stride = patch, after padding the input to
    whole patches. (B, C, T, H, W) -> (B, T*H*W patches, hidden)."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        _, _, T, H, W = x.shape
        x = F.pad(x, (0, (-W) % pw, 0, (-H) % ph, 0, (-T) % pt))
        return self.proj(x).flatten(2).transpose(1, 2)


def position_embedding_2d(dim: int, h: int, w: int, scale: float, base_size: int | None,
                          device=None) -> torch.Tensor:
    """(1, h*w, dim) sin-cos embedding of the patch grid, rows major. As in Open-Sora 1.1, the
    first half encodes the column and the second half the row, and positions are divided by
    `scale` and stretched to `base_size` so grids of any aspect ratio span a comparable range."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim // 2, 2, device=device).float() / (dim // 2)))
    rows = torch.arange(h, device=device) / scale
    cols = torch.arange(w, device=device) / scale
    if base_size is not None:
        rows = rows * (base_size / h)
        cols = cols * (base_size / w)
    row_of = rows[:, None].expand(h, w).reshape(-1)
    col_of = cols[None, :].expand(h, w).reshape(-1)

    def sincos(pos: torch.Tensor) -> torch.Tensor:
        out = torch.einsum("i,d->id", pos, inv_freq)
        return torch.cat([out.sin(), out.cos()], dim=-1)

    return torch.cat([sincos(col_of), sincos(row_of)], dim=-1).unsqueeze(0)


class FinalLayer(nn.Module):
    """Norm, adaLN from the timestep (shift, scale), then a linear to patch outputs."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x, t, x_mask=None, t0=None, T=None, S=None):
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        out = modulate(self.norm_final(x), shift, scale)
        if x_mask is not None:
            shift0, scale0 = (self.scale_shift_table[None] + t0[:, None]).chunk(2, dim=1)
            # Open-Sora 1.1 modulates conditioning frames from the already modulated tokens
            # (normalised twice); the published weights were trained with that, so it stays.
            out = select_frames(x_mask, out, modulate(self.norm_final(out), shift0, scale0), T, S)
        return self.linear(out)
