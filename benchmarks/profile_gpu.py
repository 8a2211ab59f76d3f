"""Where a bf16 training step of Focal-T goes on a GPU: the top CUDA kernels of one step (torch.profiler), beside
transformers' Swin-T. `python benchmarks/profile_gpu.py [--batch-size 64] [--image-size 224] [--without NAME ...]`
(`--without`: the Focal models without these mechanisms, benchmark.py's names)."""

import argparse
import time

import torch
from benchmark import MECHANISMS, REFERENCE, build_model
from torch.profiler import ProfilerActivity, profile


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["swin-tiny", "focal-tiny"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--without", nargs="+", default=[], choices=sorted(MECHANISMS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_gpu.py: needs a CUDA GPU")
    for name in args.models:
        without = tuple(args.without) if name != REFERENCE else ()
        model = build_model(name, args.image_size, without=without)
        print(
            f"\n=== {name}{' without ' + ', '.join(without) if without else ''}, batch {args.batch_size}, "
            f"{args.image_size} px, bf16 autocast training step"
        )
        print(profile_step(model, args.batch_size, args.image_size, args.rows))
        torch.cuda.empty_cache()


def profile_step(model, batch_size: int, image_size: int, rows: int) -> str:
    """The profiler's table of one training step after three warm-up steps, by CUDA time."""
    model = model.cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, device="cuda")
    labels = torch.randint(0, 1000, (batch_size,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    # the step's time without the profiler, and the time the host takes to issue it: when the two are close, the GPU
    # waits for the host (then fewer operators, not faster kernels, make the step faster)
    start = time.perf_counter()
    step()
    issued = time.perf_counter() - start
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)
    return (
        f"step {elapsed * 1e3:.1f} ms without the profiler, issued by the host in {issued * 1e3:.1f} ms (the GPU's "
        f"kernels: 'Self CUDA time total' below)\n{table}"
    )


if __name__ == "__main__":
    main()
