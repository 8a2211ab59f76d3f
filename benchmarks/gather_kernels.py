"""The key/value gather of the GPU path, alone: ways to take each window's keys from the head-major token source, timed
forward and backward at every block shape of a model, so that the next change to `gather_keys` is chosen by
measurement. On an H200 the gathers and their backward pass were a fifth of a Focal-T training step (README,
"Performance").

    python benchmarks/gather_kernels.py                           # CUDA, bf16, Focal-T, batch 64, 224 px
    python benchmarks/gather_kernels.py --device cpu --batch-size 2 --image-size 64 --dtype fp32   # a check

Variants (each gives `(batch_size, num_heads * num_windows * num_keys, head_dim)` from the source `(batch_size,
num_heads, num_tokens, head_dim)` and `key_index` `(num_windows, num_keys)`):
- `index_select`: `source.index_select(2, key_index.flatten())`, what `gather_keys` does (on CUDA it runs as
  `aten::gather`, which reads an int64 index for every element; its backward is `index_add_`, atomic adds);
- `rows`: the same rows by `index_select(0, ...)` of the source as one `(rows, head_dim)` matrix, with an index of
  every (image, head, key) built on the fly: one index per row of `head_dim` elements;
- `embedding`: that matrix and index through `torch.nn.functional.embedding`, whose CUDA backward sorts the index
  and sums each row's gradients without atomic adds.
Every variant's output and source gradient are checked against `index_select`'s (a mismatch exits non-zero). Times
are medians of `--steps` calls (CUDA events on CUDA), forward and backward separately, with the speed-up over
`index_select`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from benchmark import MODELS, REFERENCE, build_model, positive_int


def row_index(key_index: torch.Tensor, batch_size: int, num_heads: int, num_tokens: int) -> torch.Tensor:
    """The row of the `(batch_size * num_heads * num_tokens, head_dim)` source matrix of every gathered key:
    `(batch_size * num_heads, num_windows * num_keys)`."""
    starts = torch.arange(batch_size * num_heads, device=key_index.device)[:, None] * num_tokens
    return starts + key_index.flatten()[None]


def variants(key_index: torch.Tensor, batch_size: int, num_heads: int, num_tokens: int, head_dim: int) -> dict:
    """The gathers, each `source -> (batch_size, num_heads * num_windows * num_keys, head_dim)`."""
    flat = key_index.flatten()
    shape = (batch_size, -1, head_dim)

    def index_select(source):
        return source.index_select(2, flat).view(shape)

    def rows(source):
        index = row_index(key_index, batch_size, num_heads, num_tokens).flatten()
        return source.view(-1, head_dim).index_select(0, index).view(shape)

    def embedding(source):
        return F.embedding(row_index(key_index, batch_size, num_heads, num_tokens), source.view(-1, head_dim)).view(
            shape
        )

    return {"index_select": index_select, "rows": rows, "embedding": embedding}


def block_shapes(name: str, image_size: int) -> list[tuple[str, torch.Tensor, torch.Tensor, int, int, int]]:
    """Each distinct (key layout, heads) of the model's blocks at `image_size`: (label, key_index on the CPU, which
    keys are masked for every query, num_heads, num_tokens, head_dim)."""
    model = build_model(name, image_size)
    shapes, seen = [], set()
    side = image_size // 4
    for stage, layer in enumerate(model.focal.encoder.layers):
        for block in layer.blocks:
            attention = block.attention
            layout = attention.key_layout(side, side, torch.device("cpu"))
            key_index, masked = layout.key_index, torch.isneginf(layout.key_mask).all(dim=1)
            num_tokens = int(key_index.max()) + 1  # (at least: the source holds every row the layout reads)
            key = (tuple(key_index.shape), attention.num_heads, num_tokens)
            if key not in seen:
                seen.add(key)
                label = f"stage {stage + 1}: {key_index.shape[0]} windows x {key_index.shape[1]} keys"
                shapes.append((label, key_index, masked, attention.num_heads, num_tokens, attention.head_dim))
        side //= 2
    return shapes


def timed(function, steps: int, cuda: bool) -> float:
    """Median milliseconds of `function()` over `steps` calls after two warm-up calls."""
    for _ in range(2):
        function()
    times = []
    for _ in range(steps):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            function()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            start = time.perf_counter()
            function()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(gather, source: torch.Tensor, grad_output: torch.Tensor, steps: int, cuda: bool) -> tuple[float, float]:
    """Median milliseconds of `gather(source)` without autograd, and of the backward pass of one such gather."""
    with torch.no_grad():
        forward = timed(lambda: gather(source), steps, cuda)
    output = gather(source)
    backward = timed(lambda: torch.autograd.grad(output, source, grad_output, retain_graph=True), steps, cuda)
    return forward, backward


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="focal-tiny", choices=[name for name in MODELS if name != REFERENCE])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--image-size", type=positive_int, default=224)
    parser.add_argument("--steps", type=positive_int, default=20)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit(f"gather_kernels.py: --device cuda, but torch {torch.__version__} sees no CUDA GPU here")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    where = torch.cuda.get_device_name() if cuda else "cpu"
    print(
        f"{args.model}, batch {args.batch_size}, {args.image_size} px, {where}, {args.dtype}, torch {torch.__version__}"
    )
    print("block | variant | forward ms | backward ms | speed-up fwd / bwd")
    torch.manual_seed(0)
    mismatches = 0
    for label, key_index, masked, num_heads, num_tokens, head_dim in block_shapes(args.model, args.image_size):
        key_index = key_index.to(args.device)
        source = torch.randn(args.batch_size, num_heads, num_tokens, head_dim, device=args.device, dtype=dtype)
        source.requires_grad_()
        # as in the model, keys masked for every query (weight 0) get no gradient
        grad_output = torch.randn(
            args.batch_size, num_heads, *key_index.shape, head_dim, device=args.device, dtype=dtype
        ).masked_fill(masked.to(args.device)[:, :, None], 0)
        grad_output = grad_output.view(args.batch_size, -1, head_dim)
        # the reference: index_select in float32 (bf16 variants are held to bf16 rounding of their sums)
        exact = source.detach().float().requires_grad_()
        expected = exact.index_select(2, key_index.flatten()).view(args.batch_size, -1, head_dim)
        (expected_grad,) = torch.autograd.grad(expected, exact, grad_output.float())
        # (relative to the largest gradient: a bf16 sum of 49 duplicates rounds at every addition)
        tolerance = (1e-5 if dtype == torch.float32 else 2e-2) * float(expected_grad.abs().max())
        for name, gather in variants(key_index, args.batch_size, num_heads, num_tokens, head_dim).items():
            output = gather(source)
            (grad_source,) = torch.autograd.grad(output, source, grad_output)
            error = float((grad_source.float() - expected_grad).abs().max())
            if not torch.equal(output.float(), expected) or error > tolerance:
                print(f"{label} | {name} | MISMATCH against index_select in float32", file=sys.stderr)
                mismatches += 1
            forward, backward = measure(gather, source, grad_output, args.steps, cuda)
            if name == "index_select":
                baseline = (forward, backward)
            print(
                f"{label} | {name} | {forward:.3f} | {backward:.3f} | "
                f"{baseline[0] / forward:.2f}x / {baseline[1] / backward:.2f}x",
                flush=True,
            )
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
