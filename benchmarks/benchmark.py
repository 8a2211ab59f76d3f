"""Speed and memory of Focal models against transformers' Swin-T, measured in one run.

Every measurement runs in a fresh process (so peak memory is its own and no model warms another's caches), the
models are interleaved round by round, each process warms up before timing, and the table reports medians over
the rounds with each Focal model's ratio to Swin-T from the same run.

    python benchmarks/benchmark.py                       # CPU, fp32, 2 threads
    python benchmarks/benchmark.py --device cuda --dtype bf16

Metrics: inference images/s at batch 1 and 8 (`torch.no_grad`, eval mode), a training step's images/s at batch 8
(forward + backward + AdamW, train mode), and the training step's peak memory: on CUDA the peak allocated, on CPU
the growth of the process's peak resident memory over what it held once the model was built.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MODELS = ["swin-tiny", "focal-tiny", "focal-fast-tiny", "focal-small", "focal-base"]
MODES = ["infer-1", "infer-8", "train-8"]
REFERENCE = "swin-tiny"


def build_model(name: str, num_labels: int = 1000):
    """An ImageNet-sized classifier with random weights: an official Focal architecture or transformers' Swin-T."""
    if name == "swin-tiny":
        from transformers import SwinConfig, SwinForImageClassification

        return SwinForImageClassification(SwinConfig(num_labels=num_labels))
    from focal_hf import FocalForImageClassification, official_config

    return FocalForImageClassification(official_config(name, num_labels=num_labels))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(name: str, mode: str, device: str, dtype: str, iterations: int, warmup: int, compile_model: bool) -> dict:
    """Time one model in one mode in this process; returns images/s and peak memory (MiB)."""
    import torch

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    batch_size = int(mode.split("-")[1])
    training = mode.startswith("train")
    model = build_model(name).to(device=device, dtype=torch_dtype).train(training)
    if compile_model:
        model = torch.compile(model)
    pixel_values = torch.randn(batch_size, 3, 224, 224, device=device, dtype=torch_dtype)
    labels = torch.randint(0, 1000, (batch_size,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if training else None

    def step():
        if training:
            loss = model(pixel_values, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(pixel_values)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    baseline = _rss_bytes()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    sync()
    elapsed = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {"images_per_s": batch_size * iterations / elapsed, "peak_mib": max(peak, 0) / 2**20}


def run_worker(args, name: str, mode: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        name,
        mode,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
        "--iterations",
        str(args.iterations),
        "--warmup",
        str(args.warmup),
    ]
    if args.compile:
        command.append("--compile")
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{name} {mode} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS, help=f"models to compare (default: {MODELS})")
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table shows medians")
    parser.add_argument("--iterations", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(measure(*args.worker, args.device, args.dtype, args.iterations, args.warmup, args.compile)))
        return
    if REFERENCE not in args.models:
        args.models = [REFERENCE, *args.models]

    results: dict[tuple[str, str], list[dict]] = {}
    for round_index in range(args.rounds):
        for mode in args.modes:
            for name in args.models:
                result = run_worker(args, name, mode)
                results.setdefault((name, mode), []).append(result)
                print(
                    f"round {round_index + 1}/{args.rounds} {mode:8s} {name:16s} {result['images_per_s']:8.2f} img/s"
                    f" {result['peak_mib']:8.0f} MiB",
                    file=sys.stderr,
                    flush=True,
                )

    def median(name, mode, key):
        return statistics.median(r[key] for r in results[(name, mode)])

    import torch

    print(
        f"\n{args.device} {args.dtype}, {args.threads} threads, torch {torch.__version__}, medians of "
        f"{args.rounds} interleaved rounds ({args.iterations} timed steps each), images/s (ratio to {REFERENCE})"
    )
    header = [f"{'model':16s}"] + [f"{mode:>18s}" for mode in args.modes] + [f"{'train-8 peak MiB':>22s}"]
    print(" | ".join(header))
    for name in args.models:
        cells = [f"{name:16s}"]
        for mode in args.modes:
            value, reference = median(name, mode, "images_per_s"), median(REFERENCE, mode, "images_per_s")
            cells.append(f"{value:9.2f} ({value / reference:4.2f}x)")
        if "train-8" in args.modes:
            value, reference = median(name, "train-8", "peak_mib"), median(REFERENCE, "train-8", "peak_mib")
            cells.append(f"{value:12.0f} ({value / reference:4.2f}x)")
        print(" | ".join(cells))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({f"{n}|{m}": r for (n, m), r in results.items()}, handle, indent=1)


if __name__ == "__main__":
    main()
