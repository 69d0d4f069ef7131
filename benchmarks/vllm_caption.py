"""Benchmark: vlm_caption's vllm backend against its transformers backend, on CPU.

Both backends load the same folder (the tiny random-init Qwen2-VL of `preset: tiny`) and
caption the same requests in this process: `--clips` synthetic moving clips, three 16:9 frames
each at vlm_caption's short side (448), JPEG-encoded by the operator's own `preprocess`.
Every answer is forced to `--max-new-tokens` tokens (vLLM: `ignore_eos`; transformers:
`min_new_tokens`): the random model would stop after a word or two, a real captioner writes
sentences.

For each backend it prints the start-up seconds (building the backend: vLLM starts its engine
process, loads the weights and allocates its KV cache; transformers loads the model), the first
batch's seconds (warm-up) and captions per second over all clips in batches of `--batch-size`
(median of `--repeat` rounds), with ratios against the transformers backend. vLLM runs twice:
with torch.compile (its default) and with `enforce_eager`. Speed only: the weights are random.

Needs vLLM (the environment `make test-vllm` builds):

    .venv-vllm/bin/python benchmarks/vllm_caption.py [--clips 16] [--batch-size 8]
        [--max-new-tokens 32] [--repeat 3] [--cases transformers,vllm-eager,vllm-compiled]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from bricks.common.synthetic import ShotSpec, render_shot_frames
from bricks.engine.frames import scaled_size
from bricks.engine.operator import Frames
from bricks.operators.vlm_backends.tiny import write_tiny_vlm
from bricks.operators.vlm_caption import VlmCaption, VlmCaptionParams

CASES = ("transformers", "vllm-eager", "vllm-compiled")
SOURCE_SIZE = (1280, 720)
LENGTH = 24  # frames per synthetic clip


def requests_for(clips: int) -> list:
    """`clips` caption requests, built as a run builds them: frames at 20/50/80% of each clip, at
    the operator's short side, through its `preprocess`."""
    op = VlmCaption(VlmCaptionParams(backend="vllm", preset="tiny", device="cpu"))
    (request,) = op.frame_requests()
    width, height = scaled_size(*SOURCE_SIZE, request.short_side)
    wanted = [min(int(f * LENGTH), LENGTH - 1) for f in request.fractions]
    inputs = []
    for clip in range(clips):
        frames = [f for i, f in enumerate(render_shot_frames(ShotSpec(LENGTH, seed=clip), width, height, clip))
                  if i in wanted]
        inputs.append(op.preprocess({"kind": "video", "start_frame": 0, "end_frame": LENGTH},
                                    [Frames(wanted, frames)]))
    return inputs


def load(case: str, folder: Path, max_new_tokens: int):
    if case == "transformers":
        from bricks.operators.vlm_backends.transformers_backend import TransformersBackend

        backend = TransformersBackend.from_folder(folder, "cpu", max_new_tokens, 0.0)
        backend.model.generation_config.min_new_tokens = max_new_tokens
        return backend
    from vllm import SamplingParams

    from bricks.operators.vlm_backends.vllm_backend import VLLMBackend

    backend = VLLMBackend(folder, device="cpu", max_new_tokens=max_new_tokens, temperature=0.0,
                          tensor_parallel_size=1, gpu_memory_utilization=0.9, kv_cache_gb=1.0, max_model_len=4096,
                          max_images=3, enforce_eager=case == "vllm-eager")
    backend.sampling = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    return backend


def caption_all(backend, inputs: list, batch_size: int) -> list:
    answers = []
    for start in range(0, len(inputs), batch_size):
        answers.extend(backend.generate(inputs[start:start + batch_size]))
    failed = [a for a in answers if isinstance(a, Exception)]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed: {failed[0]}")
    return answers


def measure(case: str, folder: Path, inputs: list, args: argparse.Namespace) -> dict:
    began = time.perf_counter()
    backend = load(case, folder, args.max_new_tokens)
    startup = time.perf_counter() - began
    began = time.perf_counter()
    caption_all(backend, inputs[:args.batch_size], args.batch_size)
    warmup = time.perf_counter() - began
    rounds = []
    for _ in range(args.repeat):
        began = time.perf_counter()
        caption_all(backend, inputs, args.batch_size)
        rounds.append(time.perf_counter() - began)
    if case != "transformers":
        backend.llm.llm_engine.engine_core.shutdown()  # one engine at a time on a small machine
    del backend
    gc.collect()
    return {"case": case, "startup": startup, "warmup": warmup, "rate": len(inputs) / statistics.median(rounds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")

    inputs = requests_for(args.clips)
    results = []
    with tempfile.TemporaryDirectory(prefix="bricks-vllm-bench-") as tmp:
        folder = write_tiny_vlm(Path(tmp) / "tiny-qwen2-vl")
        for case in cases:
            results.append(measure(case, folder, inputs, args))
            print(f"... {case} done", flush=True)

    import torch
    import vllm

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
          f"vllm {vllm.__version__}; tiny random-init Qwen2-VL (speed only)")
    print(f"{args.clips} clips x 3 frames at 448 px, batches of {args.batch_size}, {args.max_new_tokens} new tokens "
          f"forced, median of {args.repeat}; vLLM runs in bfloat16, transformers in float32 (each one's CPU default)")
    base = next((r for r in results if r["case"] == "transformers"), None)
    print(f"{'backend':<16}{'start-up s':>12}{'x':>8}{'warm-up s':>11}{'captions/s':>12}{'x':>8}")
    for r in results:
        up = f"{r['startup'] / base['startup']:.2f}" if base else "-"
        rate = f"{r['rate'] / base['rate']:.2f}" if base else "-"
        print(f"{r['case']:<16}{r['startup']:>12.1f}{up:>8}{r['warmup']:>11.2f}{r['rate']:>12.2f}{rate:>8}")


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which imports this file
    main()
