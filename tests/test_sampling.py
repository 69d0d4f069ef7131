"""VAE and T5 wrappers, weight loading, and text-to-video sampling end to end with tiny models."""

from __future__ import annotations

import av
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from click.testing import CliRunner  # noqa: E402

from bricks.model.aspect import frame_size, parse_ratio  # noqa: E402
from bricks.model.cli import main as sample_cli  # noqa: E402
from bricks.model.hub import MissingModelError  # noqa: E402
from bricks.model.sampling import SampleSpec, VideoSampler  # noqa: E402
from bricks.model.text_encoder import T5TextEncoder  # noqa: E402
from bricks.model.vae import SCALING_FACTOR, VideoVAE  # noqa: E402


@pytest.fixture(scope="module")
def vae():
    return VideoVAE.tiny(micro_batch_size=3)


@pytest.fixture(scope="module")
def t5():
    return T5TextEncoder.tiny(model_max_length=24)


def test_vae_is_framewise_with_micro_batches(vae):
    torch.manual_seed(0)
    video = torch.rand(2, 3, 5, 32, 48) * 2 - 1
    z = vae.encode(video, sample=False)
    assert z.shape == (2, 4, 5, 4, 6) and not z.requires_grad
    frame = video[1, :, 3][None]
    expected = vae.module.encode(frame).latent_dist.mode() * SCALING_FACTOR
    assert torch.allclose(z[1, :, 3], expected[0], atol=1e-6)
    vae.micro_batch_size = None
    try:
        assert torch.allclose(vae.encode(video, sample=False), z, atol=1e-6)
    finally:
        vae.micro_batch_size = 3
    assert vae.decode(z).shape == (2, 3, 5, 32, 48)
    assert not torch.equal(vae.encode(video), vae.encode(video))  # a draw from the posterior by default


def test_vae_loads_a_diffusers_folder(tmp_path, vae):
    vae.module.save_pretrained(tmp_path / "vae")
    loaded = VideoVAE.from_pretrained(tmp_path / "vae")
    video = torch.rand(1, 3, 2, 16, 16) * 2 - 1
    assert torch.allclose(loaded.encode(video, sample=False), vae.encode(video, sample=False))


def test_missing_weights_say_what_where_and_how(tmp_path):
    with pytest.raises(MissingModelError, match="does not exist"):
        VideoVAE.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingModelError, match="lacks config.json; diffusion_pytorch_model.safetensors or "):
        VideoVAE.from_pretrained(tmp_path / "empty")
    with pytest.raises(MissingModelError, match=r"not found.*spiece.model or tokenizer.json.*hf download"):
        T5TextEncoder.from_pretrained("no-such-org/no-such-t5")


def test_t5_pads_to_the_caption_length_and_padding_changes_nothing(t5):
    short = t5.encode(["a red brick"])
    both = t5.encode(["a red brick", "a much longer caption about blue bricks"])
    assert short["y"].shape == (1, 1, 24, 32) and short["mask"].shape == (1, 24)
    n = int(short["mask"].sum())
    assert n == len("a red brick") + 1  # bytes plus the end-of-text token
    assert short["mask"][0, n:].sum() == 0
    assert torch.allclose(short["y"][0, 0, :n], both["y"][0, 0, :n], atol=1e-5)
    long = t5.encode(["x" * 100])
    assert long["mask"].sum() == 24  # cut to the caption length


def test_t5_loads_a_saved_folder(tmp_path, t5):
    t5.tokenizer.save_pretrained(tmp_path / "t5")
    t5.model.save_pretrained(tmp_path / "t5")
    loaded = T5TextEncoder.from_pretrained(tmp_path / "t5", model_max_length=24)
    a, b = loaded.encode(["two bricks"]), t5.encode(["two bricks"])
    assert torch.equal(a["mask"], b["mask"]) and torch.allclose(a["y"], b["y"])


def test_t5_loads_a_sentencepiece_folder_like_deepfloyds(tmp_path):
    """DeepFloyd/t5-v1_1-xxl ships spiece.model and a tokenizer_config.json naming T5Tokenizer."""
    import json

    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel

    folder = tmp_path / "t5-v1_1"
    folder.mkdir()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a red brick walks down the street\nblue bricks build a small house\n" * 50)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=30,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    (folder / "spiece.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0}))
    T5EncoderModel(T5Config(vocab_size=30, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                            feed_forward_proj="gated-gelu")).save_pretrained(folder)
    encoder = T5TextEncoder.from_pretrained(folder, model_max_length=12)
    assert encoder.tokenizer("a red brick")["input_ids"][-1] == 1  # ends with </s>
    out = encoder.encode(["a red brick", "a"])
    assert out["y"].shape == (2, 1, 12, 32) and out["mask"][1].sum() < out["mask"][0].sum()


def test_aspect_ratios_follow_open_sora():
    assert frame_size("360p", "16:9") == (360, 640)
    assert frame_size("360p", "9:16") == (640, 360)
    assert frame_size("240p", "16:9") == (240, 426)  # Open-Sora's default sampling size
    assert frame_size("240p", "1:1") == (320, 320) and frame_size("240p", 1.02) == (320, 320)
    assert parse_ratio("9/16") == pytest.approx(0.5625)
    with pytest.raises(ValueError, match="unknown resolution"):
        frame_size("361p", "16:9")


@pytest.fixture(scope="module")
def sampler():
    return VideoSampler.tiny(seed=0)


def test_generate_is_seeded_and_leaves_the_callers_rng_alone(sampler):
    spec = SampleSpec(num_frames=3, height=32, width=48, steps=3, seed=7, batch_size=2)
    sampler.model.train()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    progress = []
    videos = sampler.generate(["a red brick", "a blue car", "a green tree"], spec,
                              callback=lambda done, total: progress.append((done, total)))
    assert torch.equal(torch.get_rng_state(), state) and sampler.model.training
    assert videos.shape == (3, 3, 3, 32, 48) and videos.abs().max() <= 1
    assert progress[-1] == (6, 6)
    again = sampler.generate(["a red brick", "a blue car"], spec)
    assert torch.equal(again, videos[:2])  # a prompt's video does not depend on those after it
    other = sampler.generate(["a red brick"], SampleSpec(**{**spec.__dict__, "seed": 8}))
    assert not torch.equal(other[0], videos[0])
    sampler.model.eval()


def test_bricks_sample_writes_videos_and_images(tmp_path):
    runner = CliRunner()
    result = runner.invoke(sample_cli, ["--tiny", "--size", "32x48", "--num-frames", "4", "--steps", "2",
                                        "--fps", "24", "--frame-interval", "2", "-o", str(tmp_path / "v"),
                                        "a red brick walks", "a blue car"])
    assert result.exit_code == 0, result.output
    videos = sorted((tmp_path / "v").glob("*.mp4"))
    assert [p.name for p in videos] == ["0000-a-red-brick-walks.mp4", "0001-a-blue-car.mp4"]
    with av.open(str(videos[0])) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert len(frames) == 4 and float(stream.average_rate) == 12.0
        assert frames[0].shape == (32, 48, 3)

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a still brick\n\n")
    result = runner.invoke(sample_cli, ["--tiny", "--size", "32x32", "--num-frames", "1", "--steps", "2",
                                        "--prompts-file", str(prompts), "-o", str(tmp_path / "i")])
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "i").iterdir()] == ["0000-a-still-brick.png"]


def test_bricks_sample_without_weights_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(sample_cli, ["--ckpt", str(tmp_path / "none"), "--vae", str(tmp_path / "vae"),
                                             "--text-encoder", str(tmp_path / "t5"), "a brick"])
    assert result.exit_code == 2
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("bricks-sample: T5 text encoder:") and "does not exist" in message
    result = CliRunner().invoke(sample_cli, ["--tiny"])
    assert result.exit_code == 2 and "give prompts" in result.output
