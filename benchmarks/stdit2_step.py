"""Benchmark: STDiT2 forward + backward time and peak memory for a config and an input size.

One training step's model work (no optimizer, no data, no VAE/T5: random latents and caption
states of the right shapes) is timed after a warm-up, `--repeat` times; the median is
reported with

  - samples/s: batch / median fwd+bwd time;
  - ratio to forward alone, timed the same way in the same process (the baseline);
  - model FLOPs per sample: the forward's FLOPs counted by torch's FlopCounterMode on the real
    input (SDPA included), times 3 for forward + backward; checkpointing's recomputed forward
    is not counted, as is usual for model FLOP utilisation;
  - MFU on CUDA: achieved model FLOP/s over the GPU's dense bf16 peak (`--peak-tflops`,
    989 for an H100 SXM);
  - peak memory: torch.cuda.max_memory_allocated on CUDA, the process's peak RSS on CPU.

Models: `xl2` is Open-Sora 1.1's STDiT2-XL/2 (28 blocks, 1152 wide, 767M parameters) with the
stage-3 settings; `small` (8 blocks, 384 wide) and `tiny` (2 blocks, 48 wide) are for CPUs.
Weights are random: speed does not depend on them. Inputs are in pixels (latents are 8x smaller).

    python benchmarks/stdit2_step.py --model small --frames 16 --height 128 --width 128
    python benchmarks/stdit2_step.py --model xl2 --frames 32 --height 360 --width 640 \\
        --batch 4 --device cuda --dtype bf16 --grad-checkpointing      # on a GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from bricks.model import STDiT2, STDiT2Config

MODELS = {
    "xl2": dict(depth=28, hidden_size=1152, num_heads=16, input_sq_size=512, qk_norm=True, model_max_length=200),
    "small": dict(depth=8, hidden_size=384, num_heads=6, caption_channels=1024, input_sq_size=512, qk_norm=True,
                  model_max_length=120),
    "tiny": dict(depth=2, hidden_size=48, num_heads=4, caption_channels=32, model_max_length=16, qk_norm=True),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(config: STDiT2Config, batch: int, frames: int, height: int, width: int, device):
    tokens = config.model_max_length
    mask = torch.zeros(batch, tokens, dtype=torch.long, device=device)
    mask[:, : max(tokens * 3 // 4, 1)] = 1  # captions shorter than the padded length, as in practice
    return dict(
        x=torch.randn(batch, config.in_channels, frames, height // 8, width // 8, device=device),
        timestep=torch.randint(0, 1000, (batch,), device=device),
        y=torch.randn(batch, 1, tokens, config.caption_channels, device=device),
        mask=mask,
        num_frames=torch.full((batch,), float(frames), device=device),
        height=torch.full((batch,), float(height), device=device),
        width=torch.full((batch,), float(width), device=device),
        ar=torch.full((batch,), height / width, device=device),
        fps=torch.full((batch,), 24.0, device=device),
    )


def timed(fn, device, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="small")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="autocast dtype (default bf16 on CUDA, fp32)")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU dense bf16 peak for MFU")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(0)
    config = STDiT2Config(**MODELS[args.model], grad_checkpointing=args.grad_checkpointing, class_dropout_prob=0.0)
    model = STDiT2(config).to(device).train()  # float32 master weights, autocast computes in `dtype`
    inputs = make_inputs(config, args.batch, args.frames, args.height, args.width, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def forward():
        with torch.no_grad(), autocast:
            model(**inputs)

    def forward_backward():
        with autocast:
            out = model(**inputs)
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        forward()
    flops_per_sample = 3 * counter.get_total_flops() / args.batch

    forward_backward()  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fwd_bwd = timed(forward_backward, device, args.repeat)
    fwd = timed(forward, device, args.repeat)
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "model": args.model, "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "input": f"{args.batch} x {args.frames} x {args.height} x {args.width}", "device": str(device),
        "dtype": str(dtype).removeprefix("torch."), "grad_checkpointing": args.grad_checkpointing,
        "fwd_bwd_s": round(fwd_bwd, 4), "fwd_s": round(fwd, 4), "fwd_bwd_over_fwd": round(fwd_bwd / fwd, 2),
        "samples_per_s": round(args.batch / fwd_bwd, 3),
        "model_tflops_per_sample": round(flops_per_sample / 1e12, 3),
        "achieved_tflops": round(flops_per_sample * args.batch / fwd_bwd / 1e12, 3),
        "peak_memory_mib": round(peak_mib),
    }
    if device.type == "cuda":
        result["mfu"] = round(result["achieved_tflops"] / args.peak_tflops, 3)
        result["gpu"] = torch.cuda.get_device_name()
    for key, value in result.items():
        print(f"{key:>24}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
