"""The training configuration: one YAML file, `--set` overrides, validated before any work starts.

Sections, each read by the part of the trainer it names::

    model:       which STDiT2, VAE and T5 (or the tiny random-init trio for CPU tests)
    data:        buckets, frame interval, loader workers
    diffusion:   IDDPM steps and the conditioning-mask ratios
    optim:       AdamW, gradient clipping, EMA
    lr_schedule: constant, cosine warm-up to constant, or one-cycle
    parallel:    ddp | fsdp | colossalai, precision
    train:       seed, epochs, step limit, how often to log and checkpoint
    logging:     TensorBoard, Weights & Biases
    sampling:    fixed-seed sample videos every N steps

`--config` takes a path or the name of a shipped config (`bricks-train configs` lists them).
Every error is a `TrainConfigError` with a one-line message naming the file and the field.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bricks.common.settings import SettingsError, apply_override, first_error, parse_overrides, read_yaml_mapping
from bricks.model.sampling import DEFAULT_STDIT2
from bricks.model.text_encoder import DEFAULT_T5
from bricks.model.vae import DEFAULT_VAE

from .buckets import BucketConfigError, parse_bucket_config
from .masks import MASK_KINDS

SHIPPED = Path(__file__).parent / "configs"


class TrainConfigError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Strict):
    ckpt: str | None = DEFAULT_STDIT2
    """Starting weights: a folder (config.json + model.safetensors), a .safetensors file with
    `config`, or a repo id in the Hugging Face cache. null trains from scratch."""
    config: dict[str, Any] = {}
    """STDiT2 config fields, over the checkpoint's own (or the defaults when from scratch)."""
    vae: str = DEFAULT_VAE
    text_encoder: str = DEFAULT_T5
    model_max_length: int = Field(default=200, ge=1)
    """Caption tokens (T5 padding length)."""
    vae_micro_batch: int = Field(default=4, ge=1)
    """Frames the VAE encodes at once."""
    grad_checkpointing: bool = False
    tiny: bool = False
    """Tiny random-init STDiT2, VAE and T5 (CPU tests and smoke runs; `ckpt` may still give the
    STDiT2 weights). The trainer logs that they are in use."""
    vae_posterior: Literal["sample", "mean"] = "sample"
    """Latents encoded during training: a draw from the VAE posterior (as Open-Sora trains), or
    its mean, which is what `encode_latents` stores (rows with stored latents use those)."""


class DataSection(_Strict):
    bucket_config: dict[str, Any]
    """{resolution: {num_frames: [keep_prob, batch_size]}}, as Open-Sora 1.1 writes it."""
    frame_interval: int = Field(default=1, ge=1)
    temporal_crop: Literal["random", "center"] = "random"
    """Which frames of a longer clip are decoded: from a random start (seeded per sample and
    epoch, as Open-Sora crops), or the middle window, the crop `encode_latents` stores."""
    num_workers: int = Field(default=2, ge=0)
    """Loader processes per rank; each reads its own row groups."""
    prefetch_factor: int = Field(default=2, ge=1)
    max_skipped_fraction: float = Field(default=0.2, ge=0, le=1)
    """Stop the run when more than this share of the samples tried could not be decoded (judged
    from 64 samples on and at the end of every epoch); 1 never stops."""

    @field_validator("bucket_config")
    @classmethod
    def _buckets(cls, value: dict) -> dict:
        try:
            parse_bucket_config(value)
        except BucketConfigError as exc:
            raise ValueError(str(exc)) from None
        return value


class DiffusionSection(_Strict):
    num_timesteps: int = Field(default=1000, ge=2)
    mask_ratios: dict[str, float] | None = None
    """Probabilities of each conditioning mask (Open-Sora's names); they sum to 1. null: none."""

    @field_validator("mask_ratios")
    @classmethod
    def _ratios(cls, value: dict | None) -> dict | None:
        if value is None:
            return None
        unknown = sorted(set(value) - set(MASK_KINDS))
        if unknown:
            raise ValueError(f"unknown mask {unknown[0]!r} (known: {', '.join(MASK_KINDS)})")
        if any(not 0 <= p <= 1 for p in value.values()) or not math.isclose(sum(value.values()), 1.0, abs_tol=1e-6):
            raise ValueError(f"ratios must be in [0, 1] and sum to 1 (they sum to {sum(value.values()):g})")
        return value


class OptimSection(_Strict):
    lr: float = Field(default=2e-5, gt=0)
    """The peak learning rate (the constant one for `constant`)."""
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    """Max global gradient norm; null: no clipping."""
    ema_decay: float | None = Field(default=0.9999, ge=0, lt=1)
    """null: no EMA weights."""


class ScheduleSection(_Strict):
    kind: Literal["constant", "cosine_warmup", "one_cycle"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    """Cosine warm-up from `start_lr` to `optim.lr` (cosine_warmup, one_cycle; also constant)."""
    start_lr: float = Field(default=0.0, ge=0)
    anneal_steps: int = Field(default=0, ge=0)
    """one_cycle: cosine annealing from `optim.lr` to `final_lr` after the warm-up."""
    final_lr: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_cycle(self) -> "ScheduleSection":
        if self.kind == "one_cycle" and (self.final_lr is None or self.anneal_steps < 1):
            raise ValueError("one_cycle needs final_lr and anneal_steps >= 1")
        return self


class ParallelSection(_Strict):
    strategy: Literal["ddp", "fsdp", "colossalai"] = "ddp"
    zero_stage: Literal[2, 3] = 2
    """fsdp: 2 keeps parameters gathered between forward and backward (ZeRO-2 style), 3
    re-shards them after forward (ZeRO-3). colossalai: ZeRO-2 always."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 autocast (float32 master weights) on GPU, float32 on CPU."""
    timeout_minutes: float = Field(default=30.0, gt=0)
    """Collective timeout (a straggling or clock-skewed node fails after this, not never)."""


class RunSection(_Strict):
    seed: int = 42
    epochs: int = Field(default=1000, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    log_every: int = Field(default=10, ge=1)
    ckpt_every: int = Field(default=500, ge=1)
    keep_last: int = Field(default=3, ge=1)
    """Checkpoints kept; older ones are deleted once a newer one is complete."""
    deterministic: bool = False
    """Deterministic kernels only (slower): bitwise-repeatable runs, not just to float rounding."""


class LoggingSection(_Strict):
    tensorboard: bool = True
    """RUN/tensorboard/: the metrics (`train/...`), the throughput per bucket (`throughput/...`) and
    the sample videos (`samples/<index>`, GIFs) of every `sampling.every` steps."""
    wandb: bool = False
    """The same to Weights & Biases (the `wandb` extra; the samples as the MP4s of samples/)."""
    wandb_project: str = "bricks"
    wandb_run: str | None = None


class SamplingSection(_Strict):
    every: int = Field(default=0, ge=0)
    """Render the prompts every this many steps (0: never)."""
    prompts: list[str] = []
    num_frames: int = Field(default=16, ge=1)
    resolution: str = "240p"
    aspect_ratio: str = "16:9"
    fps: float = Field(default=24.0, gt=0)
    frame_interval: int = Field(default=3, ge=1)
    steps: int = Field(default=100, ge=2)
    cfg_scale: float = 7.0
    seed: int = 42

    @model_validator(mode="after")
    def _prompts(self) -> "SamplingSection":
        if self.every and not self.prompts:
            raise ValueError("sampling.every is set but sampling.prompts is empty")
        return self


class TrainConfig(_Strict):
    name: str | None = None
    model: ModelSection = ModelSection()
    data: DataSection
    diffusion: DiffusionSection = DiffusionSection()
    optim: OptimSection = OptimSection()
    lr_schedule: ScheduleSection = ScheduleSection()
    parallel: ParallelSection = ParallelSection()
    train: RunSection = RunSection()
    logging: LoggingSection = LoggingSection()
    sampling: SamplingSection = SamplingSection()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def resolve_config_path(ref: str | Path) -> Path:
    path = Path(ref)
    if path.is_file():
        return path
    if path.suffix == "" and (SHIPPED / f"{ref}.yaml").is_file():
        return SHIPPED / f"{ref}.yaml"
    raise TrainConfigError(f"--config {ref}: no such file, nor a shipped config "
                           f"(shipped: {', '.join(shipped_configs())})")


def load_config(ref: str | Path, overrides: list[str] = (), for_training: bool = True) -> TrainConfig:
    """`for_training=False` (a config read for its buckets and encoders) skips checking that
    its logging packages are installed."""
    path = resolve_config_path(ref)
    try:
        data = read_yaml_mapping(path, "training config",
                                 "a training config is a mapping of sections (model, data, ...)")
        for keys, value in parse_overrides(list(overrides)):
            apply_override(data, keys, value, str(path))
    except SettingsError as exc:
        raise TrainConfigError(str(exc)) from None
    return from_dict(data, str(path), for_training)


def from_dict(data: dict, where: str = "<config>", for_training: bool = True) -> TrainConfig:
    try:
        config = TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise TrainConfigError(f"{where}: {first_error(exc, TrainConfig)}") from None
    if for_training:
        check_logging(config.logging, where)
    return config


def check_logging(logging: LoggingSection, where: str) -> None:
    if logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise TrainConfigError(f"{where}: logging.tensorboard needs the tensorboard package "
                               "(pip install 'bricks[train]'), or set logging.tensorboard=false")
    if logging.wandb and importlib.util.find_spec("wandb") is None:
        raise TrainConfigError(f"{where}: logging.wandb needs the wandb package (pip install 'bricks[wandb]')")
