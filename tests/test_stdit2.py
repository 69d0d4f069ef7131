"""STDiT2: the same function as Open-Sora 1.1's, its state-dict layout, loading and training basics.

`tests/data/stdit2_tiny_opensora*` were produced by running Open-Sora 1.1's own STDiT2 (tag
v1.1.0) on a tiny config with random weights: its state dict, the inputs and its outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bricks.model import STDiT2, STDiT2Config  # noqa: E402

DATA = Path(__file__).parent / "data"
TINY = dict(depth=2, hidden_size=48, num_heads=4, caption_channels=16, model_max_length=6, qk_norm=True,
            input_sq_size=32)
CASES = ("video", "image", "x_mask", "odd", "no_pad")


def reference_inputs(name: str) -> dict:
    data = np.load(DATA / "stdit2_tiny_opensora_io.npz")
    keys = ("x", "timestep", "y", "mask", "x_mask", "num_frames", "height", "width", "ar", "fps")
    inputs = {k: torch.from_numpy(data[f"{name}.{k}"]) for k in keys if f"{name}.{k}" in data}
    return inputs, torch.from_numpy(data[f"{name}.expected"])


@pytest.fixture(scope="module")
def tiny_opensora() -> STDiT2:
    return STDiT2.from_pretrained(DATA / "stdit2_tiny_opensora.safetensors", config=STDiT2Config(**TINY)).eval()


@pytest.mark.parametrize("case", CASES)
def test_outputs_equal_open_soras(tiny_opensora, case):
    inputs, expected = reference_inputs(case)
    with torch.no_grad():
        out = tiny_opensora(**inputs)
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert ((out - expected).norm() / expected.norm()).item() < 1e-5


def test_xl2_state_dict_matches_the_published_layout():
    with torch.device("meta"):
        model = STDiT2(STDiT2Config(qk_norm=True, model_max_length=200, input_sq_size=512))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expect = {
        "x_embedder.proj.weight": (1152, 4, 1, 2, 2), "t_embedder.mlp.0.weight": (1152, 256),
        "t_block.1.weight": (6912, 1152), "t_block_temp.1.weight": (3456, 1152),
        "y_embedder.y_proj.fc1.weight": (1152, 4096), "y_embedder.y_proj.fc2.weight": (1152, 1152),
        "y_embedder.y_embedding": (200, 4096), "csize_embedder.mlp.2.weight": (384, 384),
        "ar_embedder.mlp.0.weight": (384, 256), "fl_embedder.mlp.2.weight": (1152, 1152),
        "fps_embedder.mlp.0.weight": (1152, 256), "rope.freqs": (36,),
        "final_layer.scale_shift_table": (2, 1152), "final_layer.linear.weight": (32, 1152),
        "blocks.27.scale_shift_table": (6, 1152), "blocks.27.scale_shift_table_temporal": (3, 1152),
        "blocks.27.attn.qkv.weight": (3456, 1152), "blocks.27.attn.q_norm.weight": (72,),
        "blocks.27.attn.k_norm.weight": (72,), "blocks.27.attn.proj.weight": (1152, 1152),
        "blocks.27.cross_attn.q_linear.weight": (1152, 1152), "blocks.27.cross_attn.kv_linear.weight": (2304, 1152),
        "blocks.27.cross_attn.proj.weight": (1152, 1152), "blocks.27.mlp.fc1.weight": (4608, 1152),
        "blocks.27.mlp.fc2.weight": (1152, 4608), "blocks.27.attn_temp.qkv.weight": (3456, 1152),
        "blocks.27.attn_temp.q_norm.weight": (72,), "blocks.27.attn_temp.proj.weight": (1152, 1152),
    }
    for key, shape in expect.items():
        assert shapes[key] == shape, key
    assert "blocks.28.attn.qkv.weight" not in shapes
    assert not any("norm1" in k or "norm2" in k or "norm_final" in k for k in shapes)  # LayerNorms have no affine
    params = sum(np.prod(s) for k, s in shapes.items() if k != "y_embedder.y_embedding")
    assert abs(params / 767.5e6 - 1) < 0.005
    # The tiny reference checkpoint has exactly the keys of our tiny model.
    from safetensors.torch import load_file

    assert set(load_file(DATA / "stdit2_tiny_opensora.safetensors")) == set(STDiT2(STDiT2Config(**TINY)).state_dict())


def test_save_and_load_round_trip(tmp_path, tiny_opensora):
    tiny_opensora.save_pretrained(tmp_path / "model")
    assert {p.name for p in (tmp_path / "model").iterdir()} == {"config.json", "model.safetensors"}
    again = STDiT2.from_pretrained(tmp_path / "model").eval()
    inputs, _ = reference_inputs("video")
    with torch.no_grad():
        assert torch.equal(again(**inputs), tiny_opensora(**inputs))
    torch.save(tiny_opensora.state_dict(), tmp_path / "weights.pt")
    assert torch.equal(STDiT2.from_pretrained(tmp_path / "weights.pt", config=TINY).state_dict()["rope.freqs"],
                       tiny_opensora.state_dict()["rope.freqs"])


def test_loading_errors_name_the_key(tmp_path, tiny_opensora):
    state = dict(tiny_opensora.state_dict())
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.weight: checkpoint shape \(3, 3\)"):
        STDiT2(STDiT2Config(**TINY)).load_weights(state)
    state = dict(tiny_opensora.state_dict())
    del state["final_layer.linear.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"missing keys: \['final_layer.linear.bias'\]; unexpected keys: \['extra.weight'\]"):
        STDiT2(STDiT2Config(**TINY)).load_weights(state)
    with pytest.raises(ValueError, match="needs `config`"):
        torch.save(state, tmp_path / "w.pt")
        STDiT2.from_pretrained(tmp_path / "w.pt")


def test_null_caption_resizes_to_another_token_length(tiny_opensora):
    state = tiny_opensora.state_dict()
    longer = STDiT2(STDiT2Config(**dict(TINY, model_max_length=9)))
    longer.load_weights(dict(state))
    null = longer.y_embedder.y_embedding
    assert torch.equal(null[:6], state["y_embedder.y_embedding"])
    assert torch.equal(null[6:], state["y_embedder.y_embedding"][-1:].expand(3, -1))
    shorter = STDiT2(STDiT2Config(**dict(TINY, model_max_length=4)))
    shorter.load_weights(dict(state))
    assert torch.equal(shorter.y_embedder.y_embedding, state["y_embedder.y_embedding"][:4])


def test_padding_tokens_change_nothing(tiny_opensora):
    inputs, _ = reference_inputs("video")
    noisy = dict(inputs, y=inputs["y"].clone())
    noisy["y"][0, 0, 4:] = torch.randn(2, 16) * 100  # tokens masked out for sample 0
    with torch.no_grad():
        assert torch.allclose(tiny_opensora(**inputs), tiny_opensora(**noisy), atol=1e-6)
        changed = dict(inputs, y=inputs["y"].clone())
        changed["y"][0, 0, 0] += 1.0  # a real token does change the output
        assert not torch.allclose(tiny_opensora(**inputs), tiny_opensora(**changed), atol=1e-4)


def test_corrected_qk_norm_order_is_a_flag(tiny_opensora):
    inputs, _ = reference_inputs("video")
    corrected = STDiT2(STDiT2Config(**dict(TINY, qk_norm_legacy=False))).eval()
    corrected.load_weights(tiny_opensora.state_dict())
    with torch.no_grad():
        assert not torch.allclose(corrected(**inputs), tiny_opensora(**inputs), atol=1e-4)


def test_checkpointing_freezing_and_a_few_training_steps():
    torch.manual_seed(0)
    inputs, _ = reference_inputs("video")
    model = STDiT2(STDiT2Config(**dict(TINY, grad_checkpointing=True, class_dropout_prob=0.0)))
    plain = STDiT2(STDiT2Config(**dict(TINY, class_dropout_prob=0.0)))
    plain.load_state_dict(model.state_dict())
    target = torch.randn(2, 8, 4, 6, 10)
    for m in (model, plain):
        m.train()
        ((m(**inputs) - target) ** 2).mean().backward()
    grads = [(a.grad, b.grad) for a, b in zip(model.parameters(), plain.parameters()) if a.grad is not None]
    assert grads and all(torch.allclose(a, b, atol=1e-6) for a, b in grads)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = ((model(**inputs) - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    frozen = STDiT2(STDiT2Config(**dict(TINY, freeze="not_temporal")))
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable and all("attn_temp" in n for n in trainable)


def test_bad_inputs_are_named():
    model = STDiT2(STDiT2Config(**TINY))
    inputs, _ = reference_inputs("video")
    with pytest.raises(ValueError, match="needs `fps`"):
        model(**dict(inputs, fps=None))
    with pytest.raises(ValueError, match=r"x must be \[B, C, T, H, W\]"):
        model(**dict(inputs, x=inputs["x"][:, :, 0]))


def test_bf16_autocast_stays_close_to_float32(tiny_opensora):
    inputs, expected = reference_inputs("x_mask")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_opensora(**inputs)
    assert out.dtype == torch.float32
    assert ((out - expected).norm() / expected.norm()).item() < 5e-2  # bf16 has 8 bits of mantissa
