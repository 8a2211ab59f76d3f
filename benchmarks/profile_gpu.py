"""Where a bf16 training step of Focal-T goes on a GPU: the top CUDA kernels of one step (torch.profiler), beside
transformers' Swin-T. `python benchmarks/profile_gpu.py [--batch-size 64] [--image-size 224] [--attention focal_triton]`
(`--attention`: the Focal models with the fused Triton candidate, benchmarks/triton_attention.py)."""

import argparse

import torch
from benchmark import REFERENCE, build_model, import_triton_attention
from torch.profiler import ProfilerActivity, profile


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["swin-tiny", "focal-tiny"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument(
        "--attention", choices=["focal_triton"], help="the Focal models' attention (default focal_sdpa)"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_gpu.py: needs a CUDA GPU")
    if args.attention == "focal_triton":
        import_triton_attention("profile_gpu.py")  # (registers it)
    for name in args.models:
        model = build_model(name, args.image_size)
        attention = args.attention if args.attention and name != REFERENCE else None
        if attention:
            model.set_attn_implementation(attention)
        print(
            f"\n=== {name}{f' ({attention})' if attention else ''}, batch {args.batch_size}, {args.image_size} px, "
            "bf16 autocast training step"
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
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)


if __name__ == "__main__":
    main()
