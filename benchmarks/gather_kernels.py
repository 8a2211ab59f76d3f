"""The key/value gather of the GPU path, alone: ways to take each window's keys from their token source, timed
forward and backward at every block shape of a model, so that the next change to `gather_keys` is chosen by
measurement. On an H200 the gathers and their backward pass were a fifth of a Focal-T training step
(docs/performance.md; of the earlier head-major gather).

    python benchmarks/gather_kernels.py                           # CUDA, bf16, Focal-T, batch 64, 224 px
    python benchmarks/gather_kernels.py --device cpu --batch-size 2 --image-size 64 --dtype fp32   # a check

Each variant gives the keys `(batch_size, num_keys * num_windows, dim)` of a block, key by key (the layout in which
the attention kernels hand back their gradients, `gather_keys`):
- `index_select`: from the token source `(batch_size, num_tokens, dim)` (window by window, then the pooled maps) by
  `source.index_select(1, key_index.t().flatten())`, what `gather_keys` does (its backward is `index_add_` of whole
  rows, atomic adds);
- `embedding`: the source as one `(batch_size * num_tokens, dim)` matrix through `torch.nn.functional.embedding`,
  with an index of every (image, key) built on the fly (autograd keeps it: 7 MB per first-stage block of Focal-T at
  batch 64), whose CUDA backward sorts the index and sums each row's gradients without atomic adds;
- `box` (Focal blocks whose fine keys form a box: `2 * expand_size <= window_size`, as in every official model):
  from the map `(batch_size, height, width, dim)` and each pooled map, no index at all: every window's fine keys are
  the box of side `window_size + 2 * expand_size` around it on the map padded circularly (the official `torch.roll`
  wrap-around), its pooled keys a box on each zero-padded pooled map, all strided views (`Tensor.unfold`) copied
  into place; the backward pass sums the overlapping boxes. Its fine keys come in box order (the others': own
  tokens first), so it is checked against the gather of that order.
Every variant's keys (where not masked for every query) and source gradient are checked against a float32
`index_select` (a mismatch exits non-zero). Times are medians of `--steps` calls (CUDA events on CUDA), forward and
backward separately, with the speed-up over `index_select`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from benchmark import MODELS, REFERENCE, build_model, positive_int, require_cuda

from focal_hf.configuration_focal import FocalBlockGeometry
from focal_hf.modeling_focal import (
    FocalSelfAttention,
    ceil_div,
    fine_keys,
    grid_coordinates,
    pooled_neighborhood,
    window_order,
)


@dataclass
class Block:
    """One distinct block shape of a model at an image size."""

    label: str
    key_index: torch.Tensor  # (num_windows, num_keys), on the CPU
    masked: torch.Tensor  # (num_windows, num_keys): keys masked for every query
    num_heads: int
    num_tokens: int
    head_dim: int
    side: int  # the (square) map's side, before padding to whole windows
    geometry: FocalBlockGeometry | None  # a Focal block's; None for Focal-fast


@dataclass
class Variant:
    """A way to gather `key_index`'s keys: `gather(*prepare(source))`, `prepare` taking the token source to the
    variant's inputs (not timed)."""

    key_index: torch.Tensor
    prepare: object
    gather: object


def variants(block: Block, batch_size: int, device: str) -> dict[str, Variant]:
    """The gathers of `block`'s keys, by name."""
    key_index = block.key_index.to(device)
    flat = key_index.t().flatten()
    rows = torch.arange(batch_size, device=device)[:, None] * block.num_tokens + flat[None]  # batch_size, keys

    def as_is(source):
        return (source,)

    def index_select(source):
        return source.index_select(1, flat)

    def embedding(source):
        return F.embedding(rows, source.view(-1, source.shape[-1]))

    found = {name: Variant(key_index, as_is, gather) for name, gather in [
        ("index_select", index_select), ("embedding", embedding)
    ]}  # fmt: skip
    box = box_variant(block, batch_size, device)
    if box is not None:
        found["box"] = box
    return found


def box_variant(block: Block, batch_size: int, device: str) -> Variant | None:
    """The `box` gather of a Focal block, or None where its fine keys are not a box."""
    geometry = block.geometry
    if geometry is None:
        return None
    window, expand = geometry.window_size, geometry.expand_size if geometry.has_neighbors else 0
    offsets, _ = fine_keys(geometry)
    box = [(row, col) for row in range(-expand, window + expand) for col in range(-expand, window + expand)]
    if sorted(box) != sorted(offsets):
        return None
    grid = ceil_div(block.side, window)
    padded, num_fine, box_side = grid * window, len(offsets), window + 2 * expand
    windows = grid_coordinates(grid, grid)
    box_offsets = torch.tensor(box)
    rows = (windows[0][:, None] * window + box_offsets[None, :, 0]) % padded
    cols = (windows[1][:, None] * window + box_offsets[None, :, 1]) % padded
    key_index = torch.cat([window_order(rows, cols, window, grid), block.key_index[:, num_fine:]], dim=1).to(device)
    levels = []  # (stride, side of its neighbourhood, padding before, padding after, map side)
    for level in range(geometry.num_pooled_levels):
        stride = 2**level
        side, offsets = pooled_neighborhood(geometry.focal_window, level)
        before = -int(offsets.min())  # (the neighbourhood starts this far before the window's own position)
        map_side = grid * stride
        levels.append((stride, side, before, (grid - 1) * stride + side - before - map_side, map_side))
    num_keys, dim = key_index.shape[1], block.num_heads * block.head_dim

    def prepare(source):
        """The token source -> the map `(batch, padded, padded, dim)` and each pooled map."""
        fine = source[:, : padded * padded].reshape(batch_size, grid, grid, window, window, dim)
        maps, start = [fine.transpose(2, 3).reshape(batch_size, padded, padded, dim)], padded**2
        for *_, map_side in levels:
            maps.append(source[:, start : start + map_side**2].view(batch_size, map_side, map_side, dim))
            start += map_side**2
        return maps

    def gather(fine, *pooled):
        keys = fine.new_zeros(batch_size, num_keys, grid, grid, dim)  # (zeros: the masked slots)
        if expand:  # circular padding: the official torch.roll wrap-around
            fine = torch.cat([fine[:, -expand:], fine, fine[:, :expand]], dim=1)
            fine = torch.cat([fine[:, :, -expand:], fine, fine[:, :, :expand]], dim=2)
        start = 0
        for source, (stride, side, before, after) in [(fine, (window, box_side, 0, 0))] + [
            (pooled_map, level[:4]) for pooled_map, level in zip(pooled, levels, strict=True)
        ]:
            source = F.pad(source, (0, 0, before, after, before, after))
            boxes = source.unfold(1, side, stride).unfold(2, side, stride)  # batch, grid, grid, dim, side, side
            place = keys[:, start : start + side * side].view(batch_size, side, side, grid, grid, dim)
            place.copy_(boxes.permute(0, 4, 5, 1, 2, 3))
            start += side * side
        return keys.view(batch_size, -1, dim)

    return Variant(key_index, prepare, gather)


def block_shapes(name: str, image_size: int) -> list[Block]:
    """Each distinct (key layout, heads) of the model's blocks at `image_size`."""
    model = build_model(name, image_size)
    shapes, seen = [], set()
    side = image_size // 4
    for stage, layer in enumerate(model.focal.encoder.layers):
        for block in layer.blocks:
            attention = block.attention
            layout = attention.key_layout(side, side, torch.device("cpu"))
            key_index, masked = layout.key_index, torch.isneginf(layout.key_mask).all(dim=1)
            geometry = attention.geometry if isinstance(attention, FocalSelfAttention) else None
            if geometry is not None:  # the map padded to whole windows and every pooled map
                grid = ceil_div(side, geometry.window_size)
                num_tokens = (grid * geometry.window_size) ** 2 + sum(
                    (grid * 2**level) ** 2 for level in range(geometry.num_pooled_levels)
                )
            else:
                num_tokens = int(key_index.max()) + 1
            key = (tuple(key_index.shape), attention.num_heads, num_tokens)
            if key not in seen:
                seen.add(key)
                label = f"stage {stage + 1}: {key_index.shape[0]} windows x {key_index.shape[1]} keys"
                shapes.append(
                    Block(label, key_index, masked, attention.num_heads, num_tokens, attention.head_dim, side, geometry)
                )
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


def measure(gather, inputs: list[torch.Tensor], grad_output: torch.Tensor, steps: int, cuda: bool):
    """Median milliseconds of `gather(*inputs)` without autograd, and of the backward pass of one such gather."""
    with torch.no_grad():
        forward = timed(lambda: gather(*inputs), steps, cuda)
    output = gather(*inputs)
    backward = timed(lambda: torch.autograd.grad(output, inputs, grad_output, retain_graph=True), steps, cuda)
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
    if cuda:
        require_cuda("gather_kernels.py")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    where = torch.cuda.get_device_name() if cuda else "cpu"
    print(
        f"{args.model}, batch {args.batch_size}, {args.image_size} px, {where}, {args.dtype}, torch {torch.__version__}"
    )
    print("block | variant | forward ms | backward ms | speed-up fwd / bwd")
    torch.manual_seed(0)
    mismatches = 0
    for block in block_shapes(args.model, args.image_size):
        dim = block.num_heads * block.head_dim
        source = torch.randn(args.batch_size, block.num_tokens, dim, device=args.device, dtype=dtype)
        # as in the model, keys masked for every query (weight 0) get no gradient
        live = ~block.masked.t().to(args.device)[None, :, :, None]  # 1, keys, windows, 1
        grad_output = torch.randn(args.batch_size, *block.key_index.t().shape, dim, device=args.device, dtype=dtype)
        grad_output = (grad_output * live).view(args.batch_size, -1, dim)
        for name, variant in variants(block, args.batch_size, args.device).items():
            # the reference: index_select of the variant's keys in float32 (bf16 sums are held to bf16 rounding)
            exact = source.float().requires_grad_()
            expected = exact.index_select(1, variant.key_index.t().flatten())
            (expected_grad,) = torch.autograd.grad(expected, exact, grad_output.float())
            tokens = source.clone().requires_grad_()
            output = variant.gather(*variant.prepare(tokens))
            (grad_tokens,) = torch.autograd.grad(output, tokens, grad_output)
            # (relative to the largest gradient: a bf16 sum of 49 duplicates rounds at every addition)
            tolerance = (1e-5 if dtype == torch.float32 else 2e-2) * float(expected_grad.abs().max())
            unmasked = live.expand(args.batch_size, -1, -1, -1).reshape(args.batch_size, -1, 1)
            same_keys = torch.equal(output.float() * unmasked, expected.detach() * unmasked)
            if not same_keys or float((grad_tokens.float() - expected_grad).abs().max()) > tolerance:
                print(f"{block.label} | {name} | MISMATCH against index_select in float32", file=sys.stderr)
                mismatches += 1
            inputs = [tensor.detach().contiguous().requires_grad_() for tensor in variant.prepare(source)]
            forward, backward = measure(variant.gather, inputs, grad_output, args.steps, cuda)
            if name == "index_select":
                baseline = (forward, backward)
            print(
                f"{block.label} | {name} | {forward:.3f} | {backward:.3f} | "
                f"{baseline[0] / forward:.2f}x / {baseline[1] / backward:.2f}x",
                flush=True,
            )
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
