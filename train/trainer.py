"""The training loop: shards in, a fine-tuned STDiT2 out.

Top to bottom: join the process group, index the shards, build the models (STDiT2 trained;
VAE and T5 frozen), load the latest checkpoint when resuming, wrap the model for the
strategy, then for each step: take a bucket batch, encode it without gradients, draw
conditioning masks and timesteps, IDDPM loss, backward, clip, AdamW step, EMA; log, render
samples and checkpoint every so many steps.

Every random draw of step `s` on rank `r` comes from a generator seeded with (seed, s, r),
and the LR is a function of the step: with the loader's position and the weights, optimizer
and EMA from a checkpoint, a resumed run computes exactly what the uninterrupted one would.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader

from bricks.model.iddpm import IDDPM
from bricks.model.stdit2 import STDiT2, STDiT2Config
from bricks.model.text_encoder import T5TextEncoder
from bricks.model.vae import VideoVAE

from . import checkpoint
from .buckets import Buckets, stable_seed
from .config import ModelSection, TrainConfig
from .decode import normalize
from .ema import EMA
from .latents import EncoderSpec, check_latents
from .loader import LoaderState, ShardDataset
from .lr_schedule import LRSchedule
from .masks import draw_masks
from .metrics import MetricsLog, bucket_throughput
from .parallel import TorchStrategy, World, all_sum, barrier, close_world, init_world, unwrap
from .plan import EpochPlan, assign_buckets
from .shards import ShardIndex, check_reference_sources

log = logging.getLogger("bricks")


# The share of undecodable samples (`data.max_skipped_fraction`) is judged from this many tried
# samples on, and at the end of every epoch: a few bad ones at the start do not stop a run.
SKIP_CHECK_MIN_SAMPLES = 64


class TrainError(RuntimeError):
    pass


@dataclass
class RunOptions:
    data: list[str]
    output: Path
    ckpt: str | None = None
    """Starting STDiT2 weights, over `model.ckpt` (ignored when resuming from a checkpoint)."""
    resume: bool = False
    max_steps: int | None = None
    allow_data_change: bool = False
    device: str | None = None


@dataclass
class Models:
    model: STDiT2
    vae: VideoVAE
    text_encoder: T5TextEncoder


def build_models(section: ModelSection, ckpt: str | None, device: torch.device, encoder_dtype: torch.dtype,
                 seed: int) -> Models:
    """The trained STDiT2 (float32 master weights, still on CPU) and the frozen VAE and T5
    on `device`. Real weights are only ever read from disk; the tiny trio only when asked for."""
    torch.manual_seed(seed)  # the same random init on every rank (tiny encoders, from-scratch STDiT2)
    if section.tiny:
        from bricks.model.sampling import TINY_STDIT2, tiny_encoders

        text_encoder, vae = tiny_encoders(seed, section.vae_micro_batch)
        base = {**TINY_STDIT2, **section.config}
    else:
        text_encoder = T5TextEncoder.from_pretrained(section.text_encoder, section.model_max_length, device=device,
                                                     dtype=encoder_dtype)
        vae = VideoVAE.from_pretrained(section.vae, micro_batch_size=section.vae_micro_batch)
        base = dict(section.config)
    fixed = dict(caption_channels=text_encoder.output_dim, in_channels=vae.out_channels,
                 model_max_length=text_encoder.model_max_length, grad_checkpointing=section.grad_checkpointing)
    if ckpt:
        if Path(ckpt).is_file():
            model = STDiT2.from_pretrained(ckpt, config=STDiT2Config.from_dict(base), **fixed)
        else:
            model = STDiT2.from_pretrained(ckpt, **{**base, **fixed})
        log.info("STDiT2 weights from %s", ckpt)
    else:
        model = STDiT2(STDiT2Config.from_dict({**base, **fixed}))
        if not section.tiny:
            log.warning("training STDiT2 from scratch (model.ckpt is null): random initial weights")
    vae = vae.to(device, encoder_dtype).eval().requires_grad_(False)
    return Models(model.float().train(), vae, text_encoder.to(device, encoder_dtype))


class Trainer:
    def __init__(self, config: TrainConfig, options: RunOptions) -> None:
        self.config, self.options = config, options
        self.run_dir = Path(options.output)
        self.world: World = init_world(config.parallel.timeout_minutes, options.device)
        if config.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be repeatable
            torch.use_deterministic_algorithms(True)
        precision = config.parallel.precision
        self.bf16 = precision == "bf16" or (precision == "auto" and self.world.device.type == "cuda")
        self.encoder_dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.max_steps = options.max_steps or config.train.max_steps
        self.diffusion = IDDPM(num_timesteps=config.diffusion.num_timesteps)
        self.schedule = LRSchedule(lr=config.optim.lr, **config.lr_schedule.model_dump())
        self.step = 0
        self.epoch = 0
        self.consumed = 0  # batches taken in `epoch`
        self.skipped_total = 0
        self.trained_total = 0  # samples trained on, all ranks: with skipped_total, what the skip bound judges
        self._skipped_uncounted = 0  # skips that a checkpoint without "trained" carried over, left out of it
        self._last_skip: tuple[str, str] | None = None  # (sample id, reason), for the message when stopping
        self._log_file: logging.Handler | None = None
        self._restore_level = logging.NOTSET
        self.metrics: MetricsLog | None = None
        self.saved_step: int | None = None
        self._signalled = False  # SIGTERM arrived here
        self.stopping = False  # SIGTERM arrived on some rank: checkpoint after this step and stop

    # --- set-up ----------------------------------------------------------------------------------

    def setup(self) -> None:
        config, options, world = self.config, self.options, self.world
        self._prepare_run_dir()
        resume_from = checkpoint.latest_sound(self.run_dir) if options.resume else None
        if options.resume and resume_from is None:
            log.info("--resume: %s has no checkpoint yet, starting from the beginning", self.run_dir)

        index = ShardIndex.build(options.data)
        check_reference_sources(index)
        buckets = Buckets(config.data.bucket_config, config.data.frame_interval)
        streams = max(config.data.num_workers, 1)
        self.index, self.buckets = index, buckets
        encoders = EncoderSpec.from_config(config)
        stored_latents = check_latents(index, buckets, encoders)  # before loading any model
        self.dataset = ShardDataset(index, buckets, seed=config.train.seed, world_size=world.world_size,
                                    rank=world.rank, streams=streams, temporal_crop=config.data.temporal_crop)
        log.info("data: %d samples in %d shards", len(index), len(index.files))
        if stored_latents:
            log.info("%d samples carry latents from encode_latents (centre crop, posterior mean), trained in their "
                     "stored buckets", stored_latents)

        ckpt = options.ckpt or config.model.ckpt
        if resume_from is not None and options.ckpt:
            log.warning("--ckpt %s is ignored: resuming from %s", options.ckpt, resume_from.path)
        if resume_from is not None:  # the checkpoint's own config.json and weights
            ckpt = str(resume_from.path / "model")
        self.models = build_models(config.model, ckpt, world.device, self.encoder_dtype, config.train.seed)
        self.models.model.to(world.device)
        if stored_latents:
            check_latents(index, buckets, encoders, channels=self.models.vae.out_channels)

        if config.parallel.strategy == "colossalai":
            from .colossal import ColossalStrategy

            self.strategy = ColossalStrategy(world, precision="bf16" if self.bf16 else "fp32",
                                             max_norm=config.optim.grad_clip)
        else:
            self.strategy = TorchStrategy(world, config.parallel.strategy, config.parallel.zero_stage,
                                          torch.bfloat16 if self.bf16 else None)
        optim = config.optim
        fused = world.device.type == "cuda" and config.parallel.strategy != "colossalai"
        self.model, self.optimizer = self.strategy.prepare(
            self.models.model,
            lambda params: torch.optim.AdamW(params, lr=self.schedule.at(0), betas=optim.betas, eps=optim.eps,
                                             weight_decay=optim.weight_decay, **({"fused": True} if fused else {})))
        self.ema = EMA(unwrap(self.model), optim.ema_decay) if optim.ema_decay is not None else None

        if resume_from is not None:
            state = resume_from.state
            self.strategy.load_optimizer_state(self.model, self.optimizer, resume_from.optimizer_state())
            if self.ema is not None and (resume_from.path / "ema").is_dir():
                self.ema.load(resume_from.model_state("ema"))
            elif self.ema is not None:
                log.warning("%s has no EMA weights: the EMA starts from the resumed weights", resume_from.path.name)
            self.dataset.restore(state["loader"], allow_data_change=options.allow_data_change)
            self.step = self.saved_step = state["step"]
            self.skipped_total = state.get("skipped", 0)
            self.trained_total = state.get("trained", 0)
            if "trained" not in state:  # an older checkpoint: judge the skips of this run only
                self._skipped_uncounted = self.skipped_total
            log.info("resumed from %s: step %d, epoch %d, batch %d", resume_from.path.name, self.step,
                     self.dataset.epoch, self.dataset.consumed)
        self.epoch, self.consumed = self.dataset.epoch, self.dataset.consumed

        if world.main:
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
            self.metrics = MetricsLog(self.run_dir, config.logging, config.to_dict(),
                                      resume_step=self.step if resume_from is not None else None)

    def _prepare_run_dir(self) -> None:
        if not self.options.resume and checkpoint.latest(self.run_dir) is not None:
            raise TrainError(f"{self.run_dir} already holds checkpoints: pass --resume to continue that run, "
                             "or choose another --output")
        barrier(self.world)  # every rank has looked before rank 0 changes anything
        if self.world.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.remove_partial(self.run_dir)
            self._log_file = logging.FileHandler(self.run_dir / "train.log")
            self._log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            bricks_log = logging.getLogger("bricks")
            bricks_log.addHandler(self._log_file)
            self._restore_level = bricks_log.level
            if bricks_log.getEffectiveLevel() > logging.INFO:  # train.log gets the step lines in any case
                bricks_log.setLevel(logging.INFO)
        barrier(self.world)

    # --- the loop --------------------------------------------------------------------------------

    def run(self) -> dict:
        config = self.config
        window: list[dict] = []
        progress = None
        # Preemption (SIGTERM, which torchrun passes on to its workers): save, then stop.
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if main_thread else None
        try:
            self.setup()
            progress = _Progress(self.world.main, self.max_steps)
            while self.epoch < config.train.epochs and not self._done():
                plan = self.dataset.set_epoch(self.epoch, self.consumed)
                if plan.steps == 0:
                    raise TrainError(no_batches_message(self.index, self.buckets, plan, self.config.train.seed,
                                                        self.world.world_size))
                if self.consumed == 0:
                    log.info("epoch %d: %d steps per rank (%d batches beyond them dropped to keep ranks in step, "
                             "%d samples fit no bucket)", self.epoch, plan.steps, plan.dropped_batches, plan.unassigned)
                batches = iter(self._loader())
                while self.consumed < plan.steps and not self._done():
                    started = time.perf_counter()
                    batch = next(batches)
                    waited = time.perf_counter() - started
                    metrics = self.train_step(batch)
                    self.consumed += 1
                    self.step += 1
                    metrics["data_wait"] = waited
                    metrics["step_time"] = time.perf_counter() - started
                    window.append(metrics)
                    progress.update(self.step, metrics["loss"])
                    if self.step % config.train.log_every == 0:
                        self._log(window)
                        window = []
                    self._check_skipped(epoch_done=self.consumed >= plan.steps)
                    if config.sampling.every and self.step % config.sampling.every == 0:
                        self.render_samples()
                    if self.step % config.train.ckpt_every == 0:
                        self.save()
                del batches
                if self.consumed >= plan.steps:
                    self.epoch, self.consumed = self.epoch + 1, 0
            if window:
                self._log(window)
            if self.saved_step != self.step:
                self.save()
        finally:
            if progress is not None:
                progress.close()
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
            if self.metrics is not None:
                self.metrics.close()
            if self._log_file is not None:
                bricks_log = logging.getLogger("bricks")
                bricks_log.removeHandler(self._log_file)
                bricks_log.setLevel(self._restore_level)
                self._log_file.close()
            close_world()
        return {"step": self.step, "epoch": self.epoch, "skipped": self.skipped_total, "stopped": self.stopping}

    def _done(self) -> bool:
        return self.stopping or (self.max_steps is not None and self.step >= self.max_steps)

    def _check_skipped(self, epoch_done: bool) -> None:
        """Stop when too many samples could not be decoded: a run that quietly trains on what is
        left (say, images only, when every clip's source file is gone) is worse than none."""
        skipped = self.skipped_total - self._skipped_uncounted
        tried = self.trained_total + skipped
        bound = self.config.data.max_skipped_fraction
        if not tried or skipped <= bound * tried or (tried < SKIP_CHECK_MIN_SAMPLES and not epoch_done):
            return
        example = (f"; e.g. sample {self._last_skip[0]}: {self._last_skip[1]}" if self._last_skip else "")
        raise TrainError(f"{skipped} of the {tried} samples tried by step {self.step} could not be decoded, more "
                         f"than data.max_skipped_fraction={bound:g} of them{example} (train.log lists them): fix "
                         "the shards or their source files, or raise data.max_skipped_fraction")

    def _on_sigterm(self, signum, frame) -> None:
        log.warning("SIGTERM: stopping after this step with a checkpoint (continue with --resume)")
        self._signalled = True

    def _loader(self) -> DataLoader:
        workers = self.config.data.num_workers
        options = dict(prefetch_factor=self.config.data.prefetch_factor) if workers else {}
        return DataLoader(self.dataset, batch_size=None, num_workers=workers,
                          pin_memory=self.world.device.type == "cuda", **options)

    def train_step(self, batch: dict) -> dict:
        """One optimizer step on this rank's batch; returns the step's global metrics."""
        world, config, device = self.world, self.config, self.world.device
        generator_seed = stable_seed("train-step", config.train.seed, self.step, world.rank) % (2**63)
        torch.manual_seed(generator_seed)  # VAE posterior, noise, caption dropout, timesteps, masks
        times = {}
        clock = _Clock(device)

        samples = len(batch["sample_id"])
        for sample_id, reason in batch["skipped"]:
            log.warning("skipped sample %s: %s", sample_id, reason)
            self._last_skip = (sample_id, reason)
        if samples:
            x, model_kwargs, frame_mask = self._model_inputs(batch)
        else:
            # Nothing decodable in this batch: a zero-weighted pass over a one-token input keeps
            # this rank in step with the others' gradient reduction.
            x, model_kwargs, frame_mask = self._placeholder_inputs()
        times["encode"] = clock.lap()

        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with autocast:
            losses = self.diffusion.training_losses(self.model, x, t, model_kwargs, mask=frame_mask)
        loss = losses["loss"].mean() * (1.0 if samples else 0.0)
        self.strategy.backward(loss, self.optimizer)
        times["fwd_bwd"] = clock.lap()

        # One small reduction per step: the global sample count decides whether to step at all
        # (a step on all-zero gradients would still move the weights through Adam's moments).
        sums = [float(losses["loss"].detach().sum()), float(losses["mse"].detach().sum()),
                float(losses["vb"].detach().sum())] if samples else [0.0, 0.0, 0.0]
        loss_sum, mse_sum, vb_sum, total, skipped, stopping = all_sum(
            world, [*sums, samples, len(batch["skipped"]), float(self._signalled)])
        self.skipped_total += int(skipped)
        self.trained_total += int(total)
        self.stopping = stopping > 0  # every rank learns it at the same step

        lr = self.schedule.at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm = self.strategy.clip_grad_norm(self.model, self.optimizer, config.optim.grad_clip)
        if total:
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(unwrap(self.model))
        else:
            log.warning("step %d: no rank had a decodable sample; the optimizer step is skipped", self.step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        times["optim"] = clock.lap()

        n = max(total, 1)
        return {"loss": loss_sum / n if total else None, "mse": mse_sum / n if total else None,
                "vb": vb_sum / n if total else None, "samples": int(total), "skipped": int(skipped),
                "lr": lr, "grad_norm": grad_norm, "bucket": batch["bucket"], "rank_samples": samples, **times}

    @torch.no_grad()
    def _model_inputs(self, batch: dict) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
        """Latents, the model's conditioning and the frame mask of a batch: encoded here by the
        frozen VAE and T5, or taken as the shards precomputed them."""
        device, models = self.world.device, self.models
        if "latent" in batch:
            x = batch["latent"].to(device, non_blocking=True)
        else:
            # contiguous: the noise is drawn in x's memory order (randn_like), which must be that
            # of stored latents for the two to train alike (the VAE returns a permuted view)
            x = models.vae.encode(normalize(batch["video"].to(device, non_blocking=True)),
                                  sample=self.config.model.vae_posterior == "sample").float().contiguous()
        if "t5_states" in batch:
            y, y_mask = pad_states(batch["t5_states"], models.text_encoder.model_max_length, device)
        else:
            text = models.text_encoder.encode(batch["text"])
            y, y_mask = text["y"].float(), text["mask"]
        B, T = x.shape[0], x.shape[2]  # x: (B, 4, T, H/8, W/8)
        self._check_inputs(x, y)
        kwargs = dict(
            y=y, mask=y_mask,
            height=torch.full((B,), float(batch["height"]), device=device),
            width=torch.full((B,), float(batch["width"]), device=device),
            num_frames=torch.full((B,), float(batch["num_frames"]), device=device),
            ar=torch.full((B,), batch["height"] / batch["width"], device=device),
            fps=batch["fps"].to(device),
        )
        ratios = self.config.diffusion.mask_ratios
        return x, kwargs, draw_masks(B, T, ratios).to(device) if ratios else None

    def _check_inputs(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Precomputed inputs must fit the model (encoded ones always do)."""
        cfg = unwrap(self.model).config
        if x.shape[1] != cfg.in_channels:
            raise TrainError(f"vae_latent has {x.shape[1]} channels, the STDiT2 takes in_channels={cfg.in_channels}")
        if y.shape[-1] != cfg.caption_channels:
            raise TrainError(f"t5_states are {y.shape[-1]}-d, the STDiT2 takes caption_channels={cfg.caption_channels}")

    def _placeholder_inputs(self):
        model, device = unwrap(self.model), self.world.device
        cfg = model.config
        x = torch.zeros(1, cfg.in_channels, 1, cfg.patch_size[1], cfg.patch_size[2], device=device)
        one = torch.ones(1, device=device)
        kwargs = dict(y=torch.zeros(1, 1, cfg.model_max_length, cfg.caption_channels, device=device),
                      mask=torch.ones(1, cfg.model_max_length, dtype=torch.long, device=device),
                      height=one * 8, width=one * 8, num_frames=one, ar=one, fps=one)
        return x, kwargs, None

    def _log(self, window: list[dict]) -> None:
        if not self.world.main:
            return
        seconds = sum(w["step_time"] for w in window)
        samples = sum(w["samples"] for w in window)
        losses = [w for w in window if w["samples"]]

        def mean(key, rows=window):
            return sum(w[key] for w in rows) / len(rows) if rows else None

        values = {
            "epoch": self.epoch, "loss": mean("loss", losses), "mse": mean("mse", losses), "vb": mean("vb", losses),
            "lr": window[-1]["lr"], "grad_norm": mean("grad_norm"), "samples": samples,
            "samples_per_s": samples / seconds if seconds else 0.0, "step_time": mean("step_time"),
            "data_wait": mean("data_wait"), "encode": mean("encode"), "fwd_bwd": mean("fwd_bwd"),
            "optim": mean("optim"), "skipped": sum(w["skipped"] for w in window), "skipped_total": self.skipped_total,
            "throughput": bucket_throughput(window),
        }
        if self.world.device.type == "cuda":
            values["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.world.device) / 2**30
        self.metrics.write(self.step, values)
        log.info("step %d  loss %s  lr %.3g  grad norm %.3g  %.2f samples/s  data wait %.2fs", self.step,
                 "-" if values["loss"] is None else f"{values['loss']:.4f}", values["lr"], values["grad_norm"],
                 values["samples_per_s"], values["data_wait"])

    # --- checkpoints and samples -----------------------------------------------------------------

    def save(self) -> None:
        model_state = self.strategy.model_state(self.model)
        ema_state = self.ema.full_state(model_state) if self.ema is not None else None
        optimizer_state = self.strategy.optimizer_state(self.model, self.optimizer)
        if self.world.main:
            state = {"epoch": self.epoch, "loader": self._position().to_dict(), "lr_schedule": self.schedule.to_dict(),
                     "skipped": self.skipped_total, "trained": self.trained_total, "world_size": self.world.world_size,
                     "strategy": self.config.parallel.strategy, "config": self.config.to_dict()}
            path = checkpoint.save(self.run_dir, self.step, config=unwrap(self.model).config, model=model_state,
                                   ema=ema_state, optimizer=optimizer_state, state=state,
                                   keep_last=self.config.train.keep_last)
            log.info("saved %s", path)
        self.saved_step = self.step
        barrier(self.world)

    def _position(self) -> LoaderState:
        epoch, consumed = self.epoch, self.consumed
        plan = self.dataset.plan
        if plan.epoch == epoch and consumed >= plan.steps:  # the epoch is complete: the next one starts
            epoch, consumed = epoch + 1, 0
        return LoaderState(**{**self.dataset.state(consumed).to_dict(), "epoch": epoch})

    def render_samples(self) -> None:
        from bricks.model.aspect import frame_size
        from bricks.model.sampling import SampleSpec, VideoSampler

        s = self.config.sampling
        height, width = frame_size(s.resolution, s.aspect_ratio)
        spec = SampleSpec(num_frames=s.num_frames, height=height, width=width, fps=s.fps,
                          frame_interval=s.frame_interval, steps=s.steps, cfg_scale=s.cfg_scale, seed=s.seed,
                          batch_size=min(len(s.prompts), 4))
        # Every rank samples (FSDP's forward is collective); rank 0 writes.
        sampler = VideoSampler(unwrap(self.model), self.models.vae, self.models.text_encoder)
        autocast = torch.autocast(self.world.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with autocast:
            videos = sampler.generate(s.prompts, spec)
        paths = None
        if self.world.main:
            paths = sampler.save(videos, s.prompts, self.run_dir / "samples" / f"step-{self.step:08d}", spec)
            log.info("step %d: %d samples in %s", self.step, len(paths), paths[0].parent)
        barrier(self.world)
        if paths is not None:  # past the barrier: the other ranks do not wait for TensorBoard and W&B
            self.metrics.samples(self.step, s.prompts, videos, spec.playback_fps, paths)


def no_batches_message(index: ShardIndex, buckets: Buckets, plan: EpochPlan, seed: int, world_size: int) -> str:
    """Why an epoch has no batch: every row accounted for, by what keeps it out."""
    keys = assign_buckets(index, buckets, seed, plan.epoch)
    unfit = Counter((int(index.height[i]), int(index.width[i]), 1 if index.is_image[i] else int(index.num_frames[i]))
                    for i, key in enumerate(keys) if key is None and index.usable[i])
    fitted = sum(1 for key in keys if key is not None)
    parts = []
    if index.without_text:
        parts.append(f"{index.without_text} have no caption (`text`: add vlm_caption to the recipe)")
    if index.without_media:
        parts.append(f"{index.without_media} have neither media nor a path")
    if unfit:
        sizes = ", ".join(f"{n} x {h}x{w} {'image' if t == 1 else f'{t} frames'}" for (h, w, t), n in
                          unfit.most_common(4)) + (", ..." if len(unfit) > 4 else "")
        parts.append(f"{sum(unfit.values())} fit no bucket of data.bucket_config ({sizes}; {buckets.requirements()})")
    parts.append(f"{fitted} fit a bucket")
    message = f"the data fill no bucket batch: of {len(index)} rows, " + "; ".join(parts)
    if fitted:
        message += f", too few for a batch on each of the {world_size} ranks (use fewer ranks or smaller batches)"
    return message


def pad_states(states: list[torch.Tensor], length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Precomputed T5 states [tokens, D] per caption, padded (or cut) to `length` as the T5
    encoder gives them: ([B, 1, length, D], mask [B, length])."""
    dim = states[0].shape[-1]
    y = torch.zeros(len(states), 1, length, dim, device=device)
    mask = torch.zeros(len(states), length, dtype=torch.long, device=device)
    for i, s in enumerate(states):
        n = min(len(s), length)
        y[i, 0, :n] = s[:n].to(device)
        mask[i, :n] = 1
    return y, mask


class _Clock:
    """Lap times that mean something on a GPU (waits for queued work first)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.last = time.perf_counter()

    def lap(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        lap, self.last = now - self.last, now
        return lap


class _Progress:
    """A progress bar on a terminal (rank 0); the log lines do the job elsewhere."""

    def __init__(self, main: bool, total: int | None) -> None:
        self.bar = None
        if main and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("loss {task.fields[loss]}"), transient=True)
            self.task = self.bar.add_task("train", total=total, loss="-")
            self.bar.start()

    def update(self, step: int, loss: float | None) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss="-" if loss is None else f"{loss:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def train(config: TrainConfig, options: RunOptions) -> dict:
    return Trainer(config, options).run()
