"""Benchmark: how many samples per second do the model operators' `infer` calls sustain here?

Model operators (`aesthetic_filter`, `vlm_caption`) run after the per-source stage: their
frames are served in the decode pass, `preprocess` runs in a CPU stage, and `infer` runs on
batches in a pool of actors. This script measures `infer` alone, on the operator objects,
so that decoding and the engine's scheduling do not dilute the number:

  1. build the operator from its Params and `load(device)` it (not timed in the rate);
  2. make realistic inputs: frames drawn by the synthetic brick-film generator
     (`bricks.common.synthetic.render_shot_frames`, 16:9, with a little film grain so JPEGs
     are as large as camera footage's) at the size the operator's FrameRequest asks for
     (3 frames at short side 224 for aesthetic_filter, 32 for its tiny preset, 448 for
     vlm_caption), turned into model inputs by the operator's own `preprocess` (its time per
     sample is reported too: in a run it is the CPU stage's work);
  3. call `infer` once to warm up, then time `infer` over a few batches, `--repeat` times;
     the rate is samples / median time.

Cases (`--cases`, default all; a case that cannot run here is skipped with its reason):

  aesthetic-tiny  aesthetic_filter preset tiny (32 px, 2-layer CLIP), batch 16.
  aesthetic-vitl  aesthetic_filter with the real architecture, CLIP ViT-L/14 (quickgelu) and
                  the LAION MLP, but RANDOM WEIGHTS (nothing can be downloaded here): its scores
                  mean nothing, its speed is the real model's. Batch 8 (24 images); on a 2-core
                  CPU one batch takes 25-50 s, so it is timed twice by default and warmed up on
                  a single sample.
  vlm-tiny        vlm_caption preset tiny (random-init 2-layer Qwen2-VL) on the transformers
                  backend, batch 8, max_new_tokens 32. It would emit its end token after a word
                  or two, so every answer is forced to 32 new tokens (min_new_tokens): a fixed
                  decode length, as a real captioner's sentences would take.
  openai          vlm_caption on the openai backend against a mock OpenAI-compatible server that
                  this script starts on 127.0.0.1 (a thread answering a fixed caption after
                  `--latency` seconds, modelling a remote API): concurrency 8 and 32 with batch
                  64, and concurrency 32 with the operator's default batch_size 16 (a batch
                  caps the requests in flight). Ideal rate: min(concurrency, batch) / latency.
  vllm            vlm_caption on the vllm backend, Qwen2.5-VL from the HF cache (or
                  BRICKS_MODEL_DIR); only when `import vllm` works and a CUDA GPU is present.

Cases 1-3 run on `--device` (default cpu). When a CUDA GPU is present, its utilisation is
polled with nvidia-smi every 0.5 s during each timed run (averaged over the visible GPUs at each
poll) and reported as mean / max.

Numbers from random-weight models (aesthetic-tiny, aesthetic-vitl, vlm-tiny) are for speed
only. The default run takes about 2-3 minutes on a 2-core machine, mostly aesthetic-vitl.

    python benchmarks/model_ops.py [--cases aesthetic-tiny,aesthetic-vitl,vlm-tiny,openai,vllm]
        [--repeat K] [--device cpu|cuda] [--latency S] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from bricks.engine.frames import scaled_size
from bricks.common.weights import MissingModelError
from bricks.engine.operator import Frames, ModelOperator
from bricks.common.synthetic import ShotSpec, render_shot_frames
from bricks.operators.aesthetic_filter import AestheticFilter, AestheticMLP, AestheticParams
from bricks.operators.vlm_caption import VlmCaption, VlmCaptionParams

CASES = ("aesthetic-tiny", "aesthetic-vitl", "vlm-tiny", "openai", "vllm")
SOURCE_SIZE = (1280, 720)  # frames are drawn at this aspect, scaled as the engine would serve them
CLIPS = 8  # distinct clips; batches cycle through their inputs
GRAIN = 1.5  # std of 8-bit levels: flat synthetic frames would make unrealistically small JPEGs
MOCK_CAPTION = "A red brick car drives slowly past a yellow house while the camera holds still."
GPU_POLL_SECONDS = 0.5


@dataclass
class Result:
    case: str
    label: str
    backend: str
    device: str
    batch_size: int = 0
    samples_per_repeat: int = 0
    seconds: list[float] = field(default_factory=list)  # per repeat
    load_seconds: float = 0.0
    preprocess_seconds_per_sample: float = 0.0
    gpu_util: dict[str, float] | None = None
    note: str = ""
    skipped: str | None = None

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)

    @property
    def samples_per_second(self) -> float:
        return self.samples_per_repeat / self.median_seconds

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.skipped:
            d.update(median_seconds=self.median_seconds, samples_per_second=self.samples_per_second,
                     seconds_per_sample=1 / self.samples_per_second)
        return d


# ------------------------------------------------------------------------------------------
# Inputs


def clip_frames(clip: int, short_side: int, fractions: tuple[float, ...], length: int = 24) -> Frames:
    """Frames of one synthetic moving shot at `fractions` of it, sized as the engine serves them."""
    width, height = scaled_size(*SOURCE_SIZE, short_side)
    wanted = [min(int(f * length), length - 1) for f in fractions]
    rng = np.random.default_rng(clip)
    arrays = []
    for index, frame in enumerate(render_shot_frames(ShotSpec(length, seed=clip), width, height, clip)):
        if index in wanted:
            noisy = frame.astype(np.float32) + rng.normal(0, GRAIN, frame.shape).astype(np.float32)
            arrays.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return Frames(wanted, arrays)


def prepared_inputs(op: ModelOperator, clips: int = CLIPS) -> tuple[list[Any], float]:
    """(inputs of `clips` distinct clips, preprocess seconds per sample) via the operator's own
    FrameRequest and `preprocess`."""
    (request,) = op.frame_requests()
    frames = [clip_frames(k, request.short_side, request.fractions) for k in range(clips)]
    started = time.perf_counter()
    inputs = [op.preprocess({"kind": "video", "start_frame": 0, "end_frame": 24}, [f]) for f in frames]
    return inputs, (time.perf_counter() - started) / clips


def cycle(inputs: list[Any], n: int) -> list[Any]:
    return [inputs[k % len(inputs)] for k in range(n)]


# ------------------------------------------------------------------------------------------
# GPU utilisation


def gpu_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available() and shutil.which("nvidia-smi") is not None
    except ImportError:
        return False


def poll_gpu_util() -> float | None:
    """Mean utilisation (%) over the visible GPUs now, or None when nvidia-smi fails."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
        values = [float(line) for line in out.split() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return sum(values) / len(values) if values else None


@contextmanager
def gpu_sampler(enabled: bool) -> Iterator[dict[str, float]]:
    """Polls utilisation in a thread while the block runs; fills the yielded dict on exit."""
    summary: dict[str, float] = {}
    if not enabled:
        yield summary
        return
    samples: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            value = poll_gpu_util()
            if value is not None:
                samples.append(value)
            stop.wait(GPU_POLL_SECONDS)

    thread = threading.Thread(target=poll, name="gpu-util", daemon=True)
    thread.start()
    try:
        yield summary
    finally:
        stop.set()
        thread.join()
        if samples:
            summary.update(mean=statistics.fmean(samples), max=max(samples), polls=len(samples))


# ------------------------------------------------------------------------------------------
# Timing


def time_infer(op: ModelOperator, batch: list[Any], batches: int, repeat: int, warmup: list[Any],
               sample_gpu: bool) -> tuple[list[float], dict[str, float]]:
    """Seconds per repeat of `batches` infer calls on `batch`, after one warm-up call."""
    op.infer(warmup)  # first call pays for lazy init (kernels, thread pools, caches)
    seconds = []
    with gpu_sampler(sample_gpu) as gpu:
        for _ in range(repeat):
            started = time.perf_counter()
            for _ in range(batches):
                op.infer(batch)
            seconds.append(time.perf_counter() - started)
    return seconds, gpu


def measure(result: Result, op: ModelOperator, load: Callable[[], None], batches: int, repeat: int,
            sample_gpu: bool, warmup_size: int | None = None) -> Result:
    started = time.perf_counter()
    load()
    result.load_seconds = time.perf_counter() - started
    inputs, result.preprocess_seconds_per_sample = prepared_inputs(op)
    batch = cycle(inputs, result.batch_size)
    warmup = batch[:warmup_size] if warmup_size else batch
    result.seconds, gpu = time_infer(op, batch, batches, repeat, warmup, sample_gpu)
    result.gpu_util = gpu or None
    result.samples_per_repeat = batches * result.batch_size
    return result


def report_case(r: Result) -> None:
    if r.skipped:
        print(f"  {r.case}: skipped: {r.skipped}", flush=True)
        return
    runs = ", ".join(f"{s:.2f}" for s in r.seconds)
    print(f"  {r.label}: {r.samples_per_second:.2f} samples/s, {1 / r.samples_per_second:.3g} s/sample "
          f"(repeats {runs} s for {r.samples_per_repeat} samples; load {r.load_seconds:.1f} s; "
          f"preprocess {r.preprocess_seconds_per_sample * 1e3:.2f} ms/sample){'; ' + r.note if r.note else ''}",
          flush=True)


# ------------------------------------------------------------------------------------------
# Cases


def aesthetic_tiny(args: argparse.Namespace) -> list[Result]:
    op = AestheticFilter(AestheticParams(preset="tiny", device=args.device, batch_size=16))
    r = Result("aesthetic-tiny", "aesthetic_filter tiny (random weights, speed only)", "open_clip", args.device,
               batch_size=op.params.batch_size)
    return [measure(r, op, lambda: op.load(args.device), batches=32, repeat=args.repeat or 3,
                    sample_gpu=args.gpu)]


def load_vitl_random(op: AestheticFilter, device: str) -> None:
    """What `AestheticFilter.load` does for the laion preset, minus the weights files."""
    import open_clip
    import torch

    torch.manual_seed(0)
    clip = open_clip.create_model(op.params.clip_model, pretrained=None)
    op.device = device
    op.model = (clip.visual.to(device).eval(), AestheticMLP().to(device).eval())


def aesthetic_vitl(args: argparse.Namespace) -> list[Result]:
    op = AestheticFilter(AestheticParams(preset="laion", device=args.device, batch_size=8))
    r = Result("aesthetic-vitl", "aesthetic_filter ViT-L/14 (random weights, speed only)", "open_clip",
               args.device, batch_size=op.params.batch_size, note="real architecture, random weights")
    # 25-50 s per batch on 2 CPU cores: two timed batches, warmed up on one sample, unless --repeat.
    return [measure(r, op, lambda: load_vitl_random(op, args.device), batches=1, repeat=args.repeat or 2,
                    sample_gpu=args.gpu, warmup_size=1)]


def vlm_tiny(args: argparse.Namespace) -> list[Result]:
    op = VlmCaption(VlmCaptionParams(backend="transformers", preset="tiny", device=args.device, batch_size=8,
                                     max_new_tokens=32))
    r = Result("vlm-tiny", "vlm_caption tiny (random weights, speed only)", "transformers", args.device,
               batch_size=op.params.batch_size)

    def load() -> None:
        op.load(args.device)
        # The random model emits its end token after a word or two; a real captioner writes
        # sentences. Forcing max_new_tokens makes every answer a fixed 32-token decode.
        op.model.model.generation_config.min_new_tokens = op.params.max_new_tokens

    measure(r, op, load, batches=2, repeat=args.repeat or 3, sample_gpu=args.gpu)
    words = [len(text.split()) for text in op.infer(cycle(prepared_inputs(op, 2)[0], 2))]
    r.note = f"32 new tokens forced (min_new_tokens); answers {statistics.fmean(words):.0f} words"
    return [r]


class MockServer(ThreadingHTTPServer):
    """A minimal OpenAI-compatible endpoint: fixed caption after a fixed latency."""

    daemon_threads = True
    request_queue_size = 256  # the default 5 would drop concurrent connects into 1 s SYN retries

    def __init__(self, latency: float) -> None:
        super().__init__(("127.0.0.1", 0), MockHandler)
        self.latency = latency
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak_in_flight = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def enter(self) -> None:
        with self.lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def leave(self) -> None:
        with self.lock:
            self.in_flight -= 1


class MockHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real endpoints do
    server: MockServer

    def _reply(self, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # the backend's preflight: GET /models
        self._reply({"object": "list", "data": [{"id": "mock", "object": "model"}]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.enter()
        try:
            time.sleep(self.server.latency)
        finally:
            self.server.leave()
        self._reply({"id": "mock", "object": "chat.completion", "model": "mock",
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": MOCK_CAPTION}}]})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


@contextmanager
def mock_server(latency: float) -> Iterator[MockServer]:
    server = MockServer(latency)
    thread = threading.Thread(target=server.serve_forever, name="mock-openai", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def payload_kib(op: VlmCaption) -> float:
    """Mean JPEG bytes per request (before base64), so the rate can be read against bandwidth."""
    inputs, _ = prepared_inputs(op)
    return statistics.fmean(sum(len(j) for j in request.images) for request in inputs) / 1024


def openai_case(args: argparse.Namespace) -> list[Result]:
    # A proxy from the environment must not intercept requests to the local mock.
    for name in ("NO_PROXY", "no_proxy"):
        os.environ[name] = ",".join(filter(None, [os.environ.get(name), "127.0.0.1"]))
    results = []
    with mock_server(args.latency) as server:
        for concurrency, batch_size in ((8, 64), (32, 64), (32, 16)):
            # An unset key variable: a real OPENAI_API_KEY is never sent, even to the mock.
            op = VlmCaption(VlmCaptionParams(backend="openai", model="mock", base_url=server.base_url,
                                             api_key_env="BRICKS_BENCH_MOCK_KEY", concurrency=concurrency,
                                             batch_size=batch_size, retries=0, timeout=30))
            server.peak_in_flight = 0
            r = Result("openai", f"vlm_caption openai mock, concurrency {concurrency}", "openai", "http",
                       batch_size=batch_size)

            def load(op: VlmCaption = op) -> None:
                op.check()
                op.load("cpu")

            measure(r, op, load, batches=1, repeat=args.repeat or 3, sample_gpu=args.gpu,
                    warmup_size=concurrency)
            ideal = min(concurrency, batch_size) / args.latency
            r.note = (f"latency {args.latency:g} s; ideal {ideal:.1f}/s; "
                      f"peak in flight {server.peak_in_flight}; {payload_kib(op):.0f} KiB JPEG/sample")
            results.append(r)
            report_case(r)
    return results


def vllm_case(args: argparse.Namespace) -> list[Result]:
    r = Result("vllm", f"vlm_caption vllm {args.vllm_model}", "vllm", "cuda", batch_size=args.vllm_batch)
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError as exc:
        r.skipped = f"vllm is not importable ({exc})"
        return [r]
    if not torch.cuda.is_available():
        r.skipped = "no CUDA GPU"
        return [r]
    op = VlmCaption(VlmCaptionParams(backend="vllm", model=args.vllm_model, device="cuda",
                                     batch_size=args.vllm_batch, max_new_tokens=args.vllm_max_new_tokens))
    try:
        measure(r, op, lambda: op.load("cuda"), batches=1, repeat=args.repeat or 3, sample_gpu=args.gpu)
    except MissingModelError as exc:
        r.skipped = str(exc)
        return [r]
    r.note = f"max_new_tokens {args.vllm_max_new_tokens}"
    return [r]


RUNNERS: dict[str, Callable[[argparse.Namespace], list[Result]]] = {
    "aesthetic-tiny": aesthetic_tiny, "aesthetic-vitl": aesthetic_vitl, "vlm-tiny": vlm_tiny,
    "openai": openai_case, "vllm": vllm_case,
}


# ------------------------------------------------------------------------------------------
# Report


def gpu_cell(r: Result) -> str:
    if r.skipped:
        return ""
    return f"{r.gpu_util['mean']:.0f}/{r.gpu_util['max']:.0f}%" if r.gpu_util else "-"


def print_table(results: list[Result]) -> None:
    header = (f"{'case':<54}{'batch':>6}{'samples/s':>11}{'s/sample':>10}{'median s':>10}"
              f"{'prep ms':>9}{'GPU util':>10}  note")
    print(header)
    print("-" * len(header))
    for r in results:
        if r.skipped:
            print(f"{r.label:<54}{'skipped: ' + r.skipped:>56}")
            continue
        print(f"{r.label:<54}{r.batch_size:>6}{r.samples_per_second:>11.2f}{1 / r.samples_per_second:>10.3g}"
              f"{r.median_seconds:>10.2f}{r.preprocess_seconds_per_sample * 1e3:>9.2f}{gpu_cell(r):>10}  {r.note}")


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "machine": platform.machine(), "device": args.device,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {','.join(CASES)}")
    p.add_argument("--repeat", type=int, default=None,
                   help="timed repeats per case (default 3; 2 for aesthetic-vitl)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device of the local-model cases")
    p.add_argument("--latency", type=float, default=0.5, help="mock OpenAI server's seconds per answer")
    p.add_argument("--vllm-model", default="Qwen/Qwen2.5-VL-7B-Instruct")
    p.add_argument("--vllm-batch", type=int, default=32)
    p.add_argument("--vllm-max-new-tokens", type=int, default=300)
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = p.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        p.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    if args.repeat is not None and args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.latency < 0:
        p.error("--latency must be 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.gpu = gpu_present()
    env = environment(args)
    print(f"python {env['python']}, torch {env['torch']} ({env['torch_threads']} threads), {env['cpus']} CPUs; "
          f"cases on {args.device}; " + (f"GPU {env['gpu']}: sampling its utilisation every "
                                         f"{GPU_POLL_SECONDS:g} s" if args.gpu else "no GPU present: no utilisation sampled"),
          flush=True)
    if args.device == "cuda" and env["gpu"] is None:
        print("--device cuda, but no CUDA GPU is present")
        return 2
    results: list[Result] = []
    for case in args.cases:
        print(f"{case} ...", flush=True)
        started = time.perf_counter()
        case_results = RUNNERS[case](args)
        if case != "openai":  # openai reports each concurrency as it goes
            for r in case_results:
                report_case(r)
        print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)
        results.extend(case_results)
    print("\ninfer throughput (samples/s = samples / median time of a repeat; prep = preprocess per sample; "
          "random-weight rows are for speed only)\n")
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "latency": args.latency,
                       "results": [r.to_dict() for r in results]}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
