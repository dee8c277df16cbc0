"""Benchmark: R(2+1)D-18 forward+backward clips/s per speed option, as ratios to plain eager fp32.

    .venv/bin/python benchmarks/models.py                  # CPU: batch 8, 8×112×112, a few iterations
    .venv/bin/python benchmarks/models.py --device cuda    # GPU: batch 32, 8×224×224, every option

Every option runs on a fresh model built with the same seed, in one process, so the ratios compare like
with like. On CUDA, fp32 convolutions already use TF32 (cuDNN's default); "fp16" includes a GradScaler.
`--json-out FILE` appends each option's figure as a JSON line as soon as it is measured (`make
gpu-check` times the compiled options last, so a run cut off still has the eager ones).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainer.models import autocast, prepare_for_speed, r2plus1d_18


@dataclass(frozen=True)
class Option:
    name: str
    channels_last: bool = False
    precision: str = "fp32"
    compile: bool = False


OPTIONS = {
    o.name: o
    for o in [
        Option("eager-fp32"),
        Option("channels-last", channels_last=True),
        Option("bf16", precision="bf16"),
        Option("fp16", precision="fp16"),
        Option("channels-last+bf16", channels_last=True, precision="bf16"),
        Option("compile", compile=True),
        Option("compile+bf16", compile=True, precision="bf16"),
        Option("compile+channels-last+bf16", compile=True, channels_last=True, precision="bf16"),
    ]
}
CUDA_OPTIONS = list(OPTIONS)
CPU_OPTIONS = ["eager-fp32", "channels-last"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(option: Option, args: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    """Clips/s of forward+backward (and peak GiB on CUDA) for one option on a fresh model."""
    torch.manual_seed(0)
    model = r2plus1d_18(width=args.width, num_classes=400).to(device).train()
    model = prepare_for_speed(model, channels_last=option.channels_last, compile=option.compile)
    x = torch.randn(args.batch, 3, args.frames, args.size, args.size, device=device)
    if option.channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    y = torch.randint(0, 400, (args.batch,), device=device)
    scaler = torch.amp.GradScaler(device.type) if option.precision == "fp16" else None

    def step() -> None:
        with autocast(device, option.precision):
            loss = nn.functional.cross_entropy(model(x), y)
        (scaler.scale(loss) if scaler else loss).backward()
        model.zero_grad(set_to_none=True)

    for _ in range(args.warmup):  # includes compilation for the compiled options
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return args.batch * args.iters / elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, help="default 8 on CPU, 32 on CUDA")
    parser.add_argument("--size", type=int, help="crop side, default 112 on CPU, 224 on CUDA")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--iters", type=int, help="timed iterations, default 2 on CPU, 20 on CUDA")
    parser.add_argument("--warmup", type=int, help="untimed iterations, default 1 on CPU, 5 on CUDA")
    parser.add_argument("--options", help=f"comma-separated subset of: {', '.join(OPTIONS)}")
    parser.add_argument("--json-out", type=Path, help="append each option's figure to this JSON-lines file")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    args.batch = args.batch or (32 if cuda else 8)
    args.size = args.size or (224 if cuda else 112)
    args.iters = args.iters or (20 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    names = args.options.split(",") if args.options else list(CUDA_OPTIONS if cuda else CPU_OPTIONS)
    if not cuda and not args.options and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        names.append("bf16")  # only where the CPU has native bf16; emulated bf16 is slower than fp32
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        parser.error(f"unknown options {unknown}; choose from {list(OPTIONS)}")
    if "eager-fp32" not in names:
        names.insert(0, "eager-fp32")
    device = torch.device(args.device)
    if cuda:
        torch.backends.cudnn.benchmark = True
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f"CPU {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"

    print(
        f"R(2+1)D-18 width {args.width}, batch {args.batch}, {args.frames}×{args.size}×{args.size}, "
        f"forward+backward, {args.iters} timed after {args.warmup} warm-up; {hardware}; "
        f"torch {torch.__version__}"
    )
    base = None
    shape = f"width {args.width}, batch {args.batch}, {args.frames}x{args.size}x{args.size}"
    for name in names:
        clips, peak = measure(OPTIONS[name], args, device)
        base = base or clips
        memory = f"  peak {peak:5.1f} GiB" if cuda else ""
        print(f"{name:28s} {clips:8.2f} clips/s  ×{clips / base:5.2f}{memory}", flush=True)
        if args.json_out is not None:
            figure = {
                "name": name,
                "value": round(clips, 2),
                "unit": "clips/s",
                "vs_eager_fp32": round(clips / base, 2),
            }
            figure.update({"peak_gib": round(peak, 1)} if cuda else {})
            with args.json_out.open("a", encoding="utf-8") as f:
                f.write(json.dumps({**figure, "shape": shape}) + "\n")


if __name__ == "__main__":
    main()
