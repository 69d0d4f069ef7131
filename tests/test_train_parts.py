"""The trainer's small parts: conditioning masks, LR schedules, EMA, shipped configs."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from bricks.train.config import load_config  # noqa: E402
from bricks.train.ema import EMA  # noqa: E402
from bricks.train.lr_schedule import LRSchedule  # noqa: E402
from bricks.train.masks import MASK_KINDS, STAGE3_RATIOS, draw_masks, frame_mask  # noqa: E402


def test_each_mask_kind_conditions_where_it_says():
    g = torch.Generator().manual_seed(0)
    T = 16
    for _ in range(50):
        assert frame_mask("mask_no", T, g).all()
        head = frame_mask("mask_quarter_head", T, g)
        k = int((~head).sum())
        assert 1 <= k <= T // 4 and not head[:k].any() and head[k:].all()
        tail = frame_mask("mask_quarter_tail", T, g)
        k = int((~tail).sum())
        assert 1 <= k <= T // 4 and not tail[-k:].any() and tail[:-k].all()
        both = frame_mask("mask_quarter_head_tail", T, g)
        assert not both[0] and not both[-1] and (~both).sum() % 2 == 0
        rand = frame_mask("mask_quarter_random", T, g)
        hidden = (~rand).nonzero().flatten()
        assert 1 <= len(hidden) <= T // 4 and (hidden.diff() == 1).all()  # one contiguous run
        assert (~frame_mask("mask_image_random", T, g)).sum() == 1
        assert frame_mask("mask_image_head_tail", T, g).tolist() == [False] + [True] * (T - 2) + [False]
    for kind in MASK_KINDS:
        assert frame_mask(kind, 1, g).tolist() == [True]  # a single frame is never a condition
        assert frame_mask(kind, 3, g).sum() >= 1
    with pytest.raises(ValueError, match="unknown mask kind"):
        frame_mask("mask_everything", T)


def test_masks_follow_the_ratios():
    g = torch.Generator().manual_seed(1)
    masks = draw_masks(4000, 16, STAGE3_RATIOS, g)
    assert masks.shape == (4000, 16)
    unconditioned = masks.all(dim=1).float().mean().item()
    assert unconditioned == pytest.approx(0.75, abs=0.03)
    only = draw_masks(100, 8, {"mask_image_head": 1.0}, g)
    assert not only[:, 0].any() and only[:, 1:].all()


def test_lr_schedules_of_the_text2bricks_recipes():
    one_cycle = LRSchedule("one_cycle", lr=1e-4, warmup_steps=1500, start_lr=1e-7, anneal_steps=2500, final_lr=1e-5)
    assert one_cycle.at(0) == pytest.approx(1e-7)
    assert one_cycle.at(750) == pytest.approx((1e-7 + 1e-4) / 2)
    assert one_cycle.at(1500) == pytest.approx(1e-4)
    assert one_cycle.at(1500 + 1250) == pytest.approx((1e-4 + 1e-5) / 2)
    assert one_cycle.at(4000) == one_cycle.at(10_000) == pytest.approx(1e-5)
    values = [one_cycle.at(s) for s in range(0, 4001, 50)]
    peak = values.index(max(values))
    assert values[:peak + 1] == sorted(values[:peak + 1]) and values[peak:] == sorted(values[peak:], reverse=True)

    warmup = LRSchedule("cosine_warmup", lr=1e-5, warmup_steps=500)
    assert warmup.at(0) == 0 and warmup.at(250) == pytest.approx(5e-6) and warmup.at(500) == warmup.at(9999) == 1e-5
    assert LRSchedule("constant", lr=2e-5).at(0) == 2e-5
    with pytest.raises(ValueError, match="one_cycle needs"):
        LRSchedule("one_cycle", lr=1e-4)


def test_ema_follows_trainable_weights_only():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    model[1].requires_grad_(False)
    ema = EMA(model, decay=0.9)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.params["0.weight"], start + 0.1)
    assert "1.weight" not in ema.params
    state = ema.full_state(model.state_dict())
    assert torch.equal(state["1.weight"], model[1].weight)  # frozen: the model's own
    restored = EMA(model, decay=0.9)
    restored.load(state)
    assert torch.equal(restored.params["0.weight"], ema.params["0.weight"])


def test_shipped_text2bricks_configs_load_as_written():
    c32 = load_config("text2bricks-360p-32f", ["logging.tensorboard=false"])
    assert c32.data.bucket_config == {"360p": {32: [1.0, 8]}} and c32.data.frame_interval == 4
    schedule = c32.lr_schedule
    assert (schedule.kind, schedule.warmup_steps, schedule.anneal_steps) == ("one_cycle", 1500, 2500)
    assert c32.diffusion.mask_ratios == STAGE3_RATIOS
    c64 = load_config("text2bricks-360p-64f", ["logging.tensorboard=false"])
    assert c64.data.bucket_config == {"360p": {1: [1.0, 256], 32: [1.0, 8], 64: [1.0, 4]}}
    assert (c64.data.frame_interval, c64.optim.lr, c64.lr_schedule.warmup_steps) == (2, 1e-5, 500)
    assert c64.model.ckpt == "hpcai-tech/OpenSora-STDiT-v2-stage3" and c64.model.config["qk_norm"] is True
