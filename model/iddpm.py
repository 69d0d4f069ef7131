"""IDDPM, the diffusion process Open-Sora 1.1 trains and samples STDiT2 with.

Improved DDPM (Nichol and Dhariwal, 2021): a 1000-step linear beta schedule, the model
predicting the noise (eps) and, in its other half of channels, where the variance lies
between the posterior's and beta's (learned range). Training minimises the eps MSE plus the
variational-bound term that teaches the variance (with the mean frozen in it). Sampling
walks a respaced subset of the steps, with classifier-free guidance on the first
`cfg_channel` channels of eps, as Open-Sora does.

Frame masks: `mask` [B, T] marks the frames to generate (True); the others are conditioning
frames, given to the model at t = 0 and left out of the loss.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

ModelFn = Callable[..., torch.Tensor]


class Schedule:
    """The per-step constants of a diffusion process (float64), indexed by step 0..N-1.

    `timesteps[i]` is the step of the original 1000-step process that index i stands for:
    the model is always conditioned on original steps, also when sampling respaced.
    """

    def __init__(self, betas: torch.Tensor, timesteps: torch.Tensor | None = None) -> None:
        betas = betas.double()
        if betas.ndim != 1 or len(betas) < 2 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D sequence of at least 2 values in (0, 1]")
        self.betas = betas
        self.timesteps = torch.arange(len(betas)) if timesteps is None else timesteps.long()
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1).sqrt()
        # Posterior q(x_{t-1} | x_t, x_0). Its variance is 0 at t = 0, so the log takes step 1's there.
        variance = betas * (1.0 - prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = torch.log(torch.cat([variance[1:2], variance[1:]]))
        self.posterior_mean_coef1 = betas * prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self.log_betas = betas.log()

    def __len__(self) -> int:
        return len(self.betas)

    @classmethod
    def linear(cls, num_timesteps: int = 1000) -> "Schedule":
        """Ho et al.'s linear betas, 1e-4 to 0.02, stretched to keep their shape at any length."""
        scale = 1000 / num_timesteps
        return cls(torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64))

    def respaced(self, steps: int | str) -> "Schedule":
        """The process restricted to `steps` of its steps (an int, or comma-separated counts per
        equal section, as IDDPM writes it), with betas recomputed so that the kept steps have
        the same cumulative alphas."""
        keep = spaced_steps(len(self), steps)
        betas, last = [], 1.0
        for i in keep:
            betas.append(1.0 - self.alphas_cumprod[i].item() / last)
            last = self.alphas_cumprod[i].item()
        return Schedule(torch.tensor(betas, dtype=torch.float64), self.timesteps[torch.tensor(keep)])


def spaced_steps(num_timesteps: int, counts: int | str) -> list[int]:
    """Evenly strided steps from each of len(counts) equal sections of the process, sorted."""
    counts = [int(c) for c in str(counts).split(",")]
    size, extra = divmod(num_timesteps, len(counts))
    steps, start = [], 0
    for i, count in enumerate(counts):
        section = size + (1 if i < extra else 0)
        if not 1 <= count <= section:
            raise ValueError(f"cannot take {count} steps from a section of {section}")
        stride = (section - 1) / (count - 1) if count > 1 else 1
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))
            position += stride  # accumulated, as IDDPM does, so rounding ties fall the same way
        start += section
    return sorted(set(steps))


def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] as float32, shaped to broadcast over a [B, ...] tensor like `like`."""
    out = values.to(t.device)[t].float()
    return out.view(-1, *([1] * (like.ndim - 1)))


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over all but the batch dimension; with a frame mask [B, T], over the masked frames
    of [B, C, T, H, W] only."""
    if mask is None:
        return values.mean(dim=tuple(range(1, values.ndim)))
    if values.ndim != 5 or mask.shape != (values.shape[0], values.shape[2]):
        raise ValueError(f"mask {tuple(mask.shape)} does not fit [B, T] of {tuple(values.shape)}")
    weights = mask.to(values.dtype)[:, None, :, None, None]
    per_frame = values[0, :, 0].numel()  # C * H * W
    total = (values * weights).sum(dim=(1, 2, 3, 4))
    # A sample with only conditioning frames contributes nothing (rather than 0 / 0).
    return total / (weights.sum(dim=(1, 2, 3, 4)) * per_frame).clamp(min=1)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """Log-probability of data in [-1, 1] quantised to 256 levels under N(means, exp(log_scales)^2)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class IDDPM:
    """Training loss and sampling of an eps-predicting, learned-range-sigma model.

    `model(x, timestep, **kwargs)` returns [B, 2C, ...]: eps, then the variance interpolation
    values in [-1, 1]. STDiT2 with `pred_sigma=True` is such a model.
    """

    def __init__(self, num_timesteps: int = 1000, num_sampling_steps: int | str = 100,
                 cfg_scale: float = 7.0, cfg_channel: int | None = 3) -> None:
        self.schedule = Schedule.linear(num_timesteps)
        self.sampling_schedule = self.schedule.respaced(num_sampling_steps)
        self.cfg_scale = cfg_scale
        self.cfg_channel = cfg_channel

    @property
    def num_timesteps(self) -> int:
        return len(self.schedule)

    # --- the forward process -----------------------------------------------------------------

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                 schedule: Schedule | None = None) -> torch.Tensor:
        s = schedule or self.schedule
        return _at(s.sqrt_alphas_cumprod, t, x_start) * x_start + _at(s.sqrt_one_minus_alphas_cumprod, t, x_start) * noise

    # --- the model's reverse step --------------------------------------------------------------

    @staticmethod
    def _split(output: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        C = x.shape[1]
        if output.shape != (x.shape[0], 2 * C, *x.shape[2:]):
            raise ValueError(f"model output {tuple(output.shape)} is not [B, 2C, ...] for x {tuple(x.shape)}: "
                             "IDDPM needs eps and learned sigma (pred_sigma=True)")
        return output[:, :C], output[:, C:]

    @staticmethod
    def p_mean_log_variance(s: Schedule, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                            var_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of p(x_{t-1} | x_t) from the model's eps and variance values."""
        frac = (var_values + 1) / 2  # [-1, 1] spans posterior variance .. beta
        log_variance = frac * _at(s.log_betas, t, x) + (1 - frac) * _at(s.posterior_log_variance_clipped, t, x)
        pred_x0 = _at(s.sqrt_recip_alphas_cumprod, t, x) * x - _at(s.sqrt_recipm1_alphas_cumprod, t, x) * eps
        mean = _at(s.posterior_mean_coef1, t, x) * pred_x0 + _at(s.posterior_mean_coef2, t, x) * x
        return mean, log_variance

    # --- training ------------------------------------------------------------------------------

    def training_losses(self, model: ModelFn, x_start: torch.Tensor, t: torch.Tensor,
                        model_kwargs: dict | None = None, noise: torch.Tensor | None = None,
                        mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-sample `loss` (= `mse` + `vb`) at steps `t` [B]. With a frame `mask` [B, T],
        conditioning frames (False) enter at t = 0, reach the model as `x_mask`, and are left
        out of both terms."""
        s = self.schedule
        kwargs = dict(model_kwargs or {})
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        if mask is not None:
            mask = mask.bool()
            x_t0 = self.q_sample(x_start, torch.zeros_like(t), noise)
            x_t = torch.where(mask[:, None, :, None, None], x_t, x_t0)
            kwargs["x_mask"] = mask
        eps, var_values = self._split(model(x_t, s.timesteps.to(t.device)[t], **kwargs), x_start)

        # The variational bound trains the variance only: the mean is taken from a detached eps.
        true_mean = _at(s.posterior_mean_coef1, t, x_t) * x_start + _at(s.posterior_mean_coef2, t, x_t) * x_t
        true_log_variance = _at(s.posterior_log_variance_clipped, t, x_t)
        mean, log_variance = self.p_mean_log_variance(s, x_t, t, eps.detach(), var_values)
        kl = masked_mean(normal_kl(true_mean, true_log_variance, mean, log_variance), mask) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_variance)
        nll = masked_mean(nll, mask) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)  # at the first step the bound is the decoder's likelihood

        mse = masked_mean((noise - eps) ** 2, mask)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # --- sampling ------------------------------------------------------------------------------

    def guided(self, model: ModelFn, cfg_scale: float) -> ModelFn:
        """`model` on a batch [cond; uncond] returning guided eps for both halves.

        Guidance applies to the first `cfg_channel` channels only (Open-Sora 1.1 samples with
        3 of the 4); the rest of eps and the variance values come from each half as is.
        """
        def forward(x: torch.Tensor, timestep: torch.Tensor, **kwargs) -> torch.Tensor:
            half = x[: len(x) // 2]
            out = model(torch.cat([half, half]), timestep, **kwargs)
            channels = self.cfg_channel if self.cfg_channel is not None else out.shape[1] // 2
            eps, rest = out[:, :channels], out[:, channels:]
            cond, uncond = eps.chunk(2)
            guided = uncond + cfg_scale * (cond - uncond)
            return torch.cat([torch.cat([guided, guided]), rest], dim=1)

        return forward

    @torch.no_grad()
    def sample(self, model: ModelFn, z: torch.Tensor, y: torch.Tensor, y_null: torch.Tensor,
               model_kwargs: dict | None = None, cfg_scale: float | None = None,
               callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Denoise noise `z` [B, C, T, H, W] under captions `y` [B, 1, L, D] with classifier-free
        guidance against `y_null`, over the respaced steps. Noise comes from torch's global RNG:
        seed it for reproducible samples. `callback(step, total)` reports progress."""
        s = self.sampling_schedule
        forward = self.guided(model, self.cfg_scale if cfg_scale is None else cfg_scale)
        kwargs = dict(model_kwargs or {}, y=torch.cat([y, y_null]))
        # Both halves are carried through the loop, as Open-Sora does, so that a seed gives the
        # same noise draws, and so the same video, as there.
        x = torch.cat([z, z])
        total = len(s)
        for done, i in enumerate(reversed(range(total))):
            t = torch.full((len(x),), i, device=x.device, dtype=torch.long)
            eps, var_values = self._split(forward(x, s.timesteps.to(x.device)[t], **kwargs), x)
            mean, log_variance = self.p_mean_log_variance(s, x, t, eps, var_values)
            noise = torch.randn_like(x)
            x = mean + (0.5 * log_variance).exp() * noise if i > 0 else mean
            if callback is not None:
                callback(done + 1, total)
        return x[: len(z)]
