"""IDDPM: schedule, respacing, training loss with frame masks, guided sampling."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from bricks.model import STDiT2, STDiT2Config  # noqa: E402
from bricks.model.iddpm import IDDPM, Schedule, spaced_steps  # noqa: E402


def test_linear_schedule():
    s = Schedule.linear(1000)
    assert len(s) == 1000
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    expected = math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(1000))
    assert s.alphas_cumprod[-1].item() == pytest.approx(expected, rel=1e-9)


def test_respacing_takes_open_soras_steps():
    # Open-Sora 1.1 (IDDPM's space_timesteps) gives these for 100 steps and for "10,20,5".
    steps = spaced_steps(1000, 100)
    assert steps[:12] == [0, 10, 20, 30, 40, 50, 61, 71, 81, 91, 101, 111]
    assert steps[-5:] == [959, 969, 979, 989, 999] and len(steps) == 100 and sum(steps) == 49950
    sections = spaced_steps(1000, "10,20,5")
    assert len(sections) == 35 and sum(sections) == 15830 and sections[:4] == [0, 37, 74, 111]
    with pytest.raises(ValueError, match="cannot take"):
        spaced_steps(10, 11)


def test_respaced_schedule_keeps_the_noise_levels():
    full = Schedule.linear(1000)
    spaced = full.respaced(50)
    assert len(spaced) == 50
    kept = spaced.timesteps
    assert torch.allclose(spaced.alphas_cumprod, full.alphas_cumprod[kept], rtol=1e-12)


def _oracle_eps(diffusion_schedule: Schedule, x0: torch.Tensor, exact_variance: bool = True):
    """A model that knows the data is the single point x0: predicts the true noise, and the
    posterior's variance (var values -1)."""
    alphas_cumprod = diffusion_schedule.alphas_cumprod

    def model(x, timestep, **kwargs):
        ac = alphas_cumprod[timestep].float().view(-1, 1, 1, 1, 1)
        eps = (x - ac.sqrt() * x0) / (1 - ac).sqrt()
        return torch.cat([eps, -torch.ones_like(eps)], dim=1)

    return model


def test_loss_vanishes_for_a_model_that_knows_the_answer():
    diffusion = IDDPM()
    torch.manual_seed(0)
    x0 = torch.rand(2, 4, 3, 4, 4) * 2 - 1
    t = torch.tensor([10, 700])
    terms = diffusion.training_losses(_oracle_eps(diffusion.schedule, x0), x0, t)
    assert terms["mse"].max().item() < 1e-8
    assert terms["vb"].abs().max().item() < 1e-4  # KL between equal Gaussians
    assert torch.equal(terms["loss"], terms["mse"] + terms["vb"])


def test_conditioning_frames_enter_clean_and_stay_out_of_the_loss():
    diffusion = IDDPM()
    torch.manual_seed(0)
    x0, noise = torch.randn(2, 4, 5, 4, 4), torch.randn(2, 4, 5, 4, 4)
    mask = torch.tensor([[False, True, True, True, True], [True, True, True, True, False]])
    t = torch.tensor([500, 999])
    seen = {}

    def model(x, timestep, x_mask=None, bump=0.0):
        seen["x"], seen["x_mask"] = x, x_mask
        out = torch.cat([torch.zeros_like(x), torch.zeros_like(x)], dim=1)
        out[0, :, ~x_mask[0]] += bump  # sample 0's conditioning frame, eps and variance values
        return out

    terms = diffusion.training_losses(model, x0, t, noise=noise, mask=mask)
    assert torch.equal(seen["x_mask"], mask)
    clean = diffusion.q_sample(x0, torch.zeros_like(t), noise)
    assert torch.equal(seen["x"][0, :, 0], clean[0, :, 0]) and torch.equal(seen["x"][1, :, 4], clean[1, :, 4])
    assert not torch.allclose(seen["x"][0, :, 1], clean[0, :, 1])
    # MSE over generated frames only: the model outputs 0, so it is the mean square of their noise.
    assert terms["mse"][0].item() == pytest.approx(noise[0, :, 1:].pow(2).mean().item(), rel=1e-6)
    bumped = diffusion.training_losses(lambda x, ts, **kw: model(x, ts, bump=5.0, **kw), x0, t, noise=noise, mask=mask)
    assert torch.allclose(bumped["loss"], terms["loss"])


def test_guidance_applies_to_the_first_channels_only():
    diffusion = IDDPM(cfg_channel=3)

    def model(x, timestep, y):
        return torch.cat([x + y.view(-1, 1, 1, 1, 1), x * 0 + y.view(-1, 1, 1, 1, 1)], dim=1)  # [B, 8, ...]

    x = torch.randn(2, 4, 2, 2, 2)
    y = torch.tensor([1.0, 0.0])  # cond, uncond
    out = diffusion.guided(model, cfg_scale=7.0)(x, torch.zeros(2, dtype=torch.long), y=y)
    raw = model(torch.cat([x[:1], x[:1]]), None, y)
    guided = raw[1, :3] + 7.0 * (raw[0, :3] - raw[1, :3])
    assert torch.allclose(out[0, :3], guided) and torch.allclose(out[1, :3], guided)
    assert torch.equal(out[:, 3:], raw[:, 3:])  # eps channel 4 and the variance values: as computed


def test_sampling_finds_the_only_answer():
    diffusion = IDDPM(num_sampling_steps=25, cfg_scale=4.0, cfg_channel=None)
    x0 = torch.rand(1, 4, 2, 4, 4) * 2 - 1
    oracle = _oracle_eps(diffusion.schedule, x0)
    torch.manual_seed(3)
    z = torch.randn_like(x0)
    steps = []
    torch.manual_seed(4)
    out = diffusion.sample(lambda x, t, y: oracle(x, t), z, torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 2, 3),
                           callback=lambda done, total: steps.append((done, total)))
    assert steps[-1] == (25, 25) and len(steps) == 25
    assert (out - x0).abs().max().item() < 1e-2
    torch.manual_seed(4)
    again = diffusion.sample(lambda x, t, y: oracle(x, t), z, torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 2, 3))
    assert torch.equal(out, again)


def test_a_few_training_steps_reduce_the_loss_of_a_tiny_stdit2():
    torch.manual_seed(0)
    config = STDiT2Config(depth=2, hidden_size=48, num_heads=4, caption_channels=16, model_max_length=6,
                          class_dropout_prob=0.0)
    model = STDiT2(config).train()
    diffusion = IDDPM()
    x0 = torch.randn(2, 4, 3, 8, 8)
    kwargs = dict(y=torch.randn(2, 1, 6, 16), mask=torch.ones(2, 6, dtype=torch.long),
                  height=torch.full((2,), 64.0), width=torch.full((2,), 64.0), num_frames=torch.full((2,), 3.0),
                  ar=torch.ones(2), fps=torch.full((2,), 24.0))
    t, noise = torch.tensor([100, 600]), torch.randn_like(x0)
    mask = torch.tensor([[True, True, True], [False, True, True]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = diffusion.training_losses(model, x0, t, kwargs, noise=noise, mask=mask)["loss"].mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0]
