"""Peak memory of a GPU training step, estimated without a GPU.

    python benchmarks/gpu_memory.py                    # Swin-T, Focal-T/S/B, Focal-fast-T; batch 64; 224 and 448 px
    python benchmarks/gpu_memory.py --models swin-tiny focal-tiny --batch-size 32 --image-sizes 224
    python benchmarks/gpu_memory.py --without regathered-keys       # the gathered keys kept for the backward pass
    python benchmarks/gpu_memory.py --traffic                       # the bytes read and written instead (GB)
    python benchmarks/gpu_memory.py --traffic --without triton-kernels  # focal_sdpa's GPU path without its kernels
    python benchmarks/gpu_memory.py --checkpointing --without triton-kernels  # with activation checkpointing
    python benchmarks/gpu_memory.py --launches --image-sizes 224    # what a GPU's host launches per step instead

Each model runs one training step as `benchmark.py --device cuda --dtype bf16` does (forward under bf16 autocast,
backward, AdamW; after one step that creates the optimizer state) on PyTorch's meta device: tensors with shapes and
dtypes but no data, so the largest model and batch take seconds and no memory. `MemTracker` (torch.distributed's memory
tracker) counts the bytes of the tensors alive at every moment. Three things a CUDA GPU does differently are reproduced:
focal_sdpa takes its GPU path, the fused Triton kernels (where Triton is installed; their launches do nothing on the
meta device but count the bytes of their arguments: `MetaLaunch`), scaled-dot-product attention runs the
memory-efficient kernel (what CUDA picks for an additive float bias, whose meta implementation gives the kernel's
outputs and what it keeps), and autocast's casting rules (matrix products and convolutions in bf16; normalisation,
softmax and losses in float32) are applied by a function mode, since autocast has no meta device. Reported, as
`benchmark.py` does on CUDA: the peak over the step less the weights, in MiB, and each model's ratio to Swin-T at the
same image size.

With `--traffic` it counts instead the bytes that the step's operators read and write (`Traffic`), a proxy for the
time a GPU spends on memory-bound work (copies, casts, gathers, elementwise operators). With `--launches` it counts
what the step launches on a GPU (`Launches`: every operator but views, aliases and host reads, and each Triton kernel):
where the host, not the GPU, sets a step's pace (`profile_gpu.py`), each launch costs it time whatever the kernel does
(an aten operator's some µs, a Triton kernel's through `triton.autotune` ~55 µs), and the model's Python the rest.

What it leaves out: the CUDA caching allocator's rounding and the kernels' workspaces. Checked against one real
H200 (`benchmark.py`, torch 2.11; estimating the code measured there, which kept the gathered keys and values for
the backward pass, as 8e5f233 does), batch 64, estimated against measured MiB: 224 px Swin-T 4,243 / 4,341, Focal-T
5,519 / 5,611, Focal-fast-T 5,225 / 5,317; 448 px 16,210 / 16,344, 21,386 / 21,507, 21,209 / 21,332. Estimates run
1-2 % low, their ratios to Swin-T within 0.01 of the measured ones.
"""

from __future__ import annotations

import argparse
import contextlib
import functools

import torch
import torch.nn.functional as F
from benchmark import MECHANISMS, MODELS, REFERENCE, build_model, positive_int, write_json
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from focal_hf import modeling_focal

LOW_PRECISION = {
    F.linear,
    F.conv2d,
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.mm,
    torch.bmm,
    torch.addmm,
    torch.baddbmm,
    F.scaled_dot_product_attention,
}
FULL_PRECISION = {F.layer_norm, F.group_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.cross_entropy}


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(item, dtype) for item in value)
    return value


class Autocast(TorchFunctionMode):
    """bf16 autocast's casting rules for the functions models call, on any device (the meta device has none). Focal
    models ask torch whether autocast is on to cast their projections' input once (`autocast_input`) and to turn it
    off around Focal-fast's position MLPs (`without_autocast`): torch says no on the meta device, so that cast is
    made, and the rules paused, here as autocast on CUDA has it done."""

    def __enter__(self):
        self._replaced = modeling_focal.autocast_input, modeling_focal.without_autocast
        modeling_focal.autocast_input = functools.partial(_cast, dtype=torch.bfloat16)
        modeling_focal.without_autocast = self.paused
        self._paused = False
        return super().__enter__()

    def __exit__(self, *exc):
        modeling_focal.autocast_input, modeling_focal.without_autocast = self._replaced
        return super().__exit__(*exc)

    @contextlib.contextmanager
    def paused(self, device=None):
        self._paused, paused = True, self._paused
        try:
            yield
        finally:
            self._paused = paused

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = torch.bfloat16 if func in LOW_PRECISION else torch.float32 if func in FULL_PRECISION else None
        if self._paused:
            dtype = None
        if dtype is not None:
            args, kwargs = _cast(args, dtype), {name: _cast(value, dtype) for name, value in kwargs.items()}
            if func in (F.softmax, torch.softmax, torch.Tensor.softmax):
                kwargs.pop("dtype", None)
        return func(*args, **kwargs)


def memory_efficient_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """`F.scaled_dot_product_attention` as a CUDA GPU runs it with an additive float mask: the memory-efficient
    kernel (its meta implementation), the mask broadcast to the full shape."""
    if attn_mask is not None:
        shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        attn_mask = attn_mask.to(query.dtype).expand(shape)
    inputs = (query, key, value, attn_mask)
    log_sumexp = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, log_sumexp, dropout_p, is_causal, scale=scale
    )[0]


def prepared_step(model: torch.nn.Module, batch_size: int, image_size: int, device: str = "meta"):
    """A function running one bf16-autocast training step of `model` (an image classifier on `device`: forward,
    backward, AdamW), after a first step that creates the optimizer state; and the optimizer."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, device=device)
    labels = torch.zeros(batch_size, dtype=torch.long, device=device)

    def step():
        with Autocast():
            loss = model(pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # creates the optimizer state
    return step, optimizer


def training_step_peak(model: torch.nn.Module, batch_size: int, image_size: int, device: str = "meta") -> int:
    """Peak bytes alive during one bf16-autocast training step of `model` (an image classifier on `device`) with an
    existing AdamW state, less the weights."""
    from torch.distributed._tools.mem_tracker import MemTracker

    step, optimizer = prepared_step(model, batch_size, image_size, device)
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    peak = tracker.get_tracker_snapshot("peak")[torch.device(device)]["Total"]
    return peak - sum(p.numel() * p.element_size() for p in model.parameters())


class StepCount(TorchDispatchMode):
    """A count kept over the operators dispatched within (`__torch_dispatch__`), to which `MetaLaunch` adds the
    launches of focal_sdpa's Triton kernels (`kernel`), which dispatch no operator."""

    ALIASES = {torch.ops.aten._unsafe_view.default, torch.ops.aten.alias.default, torch.ops.aten.detach.default}

    active: list[StepCount] = []  # (the counts entered, innermost last: what `MetaLaunch` adds to)

    def __enter__(self):
        StepCount.active.append(self)
        return super().__enter__()

    def __exit__(self, *exc_info):
        StepCount.active.remove(self)
        return super().__exit__(*exc_info)

    def kernel(self, args) -> None:
        """Count a Triton kernel's launch with these arguments."""
        raise NotImplementedError


class Traffic(StepCount):
    """Counts the bytes the operators read and write: every tensor an operator takes or returns, except for views and
    aliases (which move nothing) and the inputs of factories such as `new_zeros` (which read nothing). A proxy for
    the time a GPU spends on memory-bound work; matrix products and attention kernels are counted by their operands
    too, well below what they cost."""

    FACTORIES = {"new_zeros", "new_empty", "new_ones", "new_full", "empty_like", "zeros_like", "ones_like"}

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def count(self, moved) -> None:
        """Add the bytes of the tensors in `moved` (any nesting of lists, tuples and dicts)."""
        self.bytes += sum(
            tensor.numel() * tensor.element_size() for tensor in tree_leaves(moved) if isinstance(tensor, torch.Tensor)
        )

    kernel = count  # (a kernel reads and writes its arguments)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        if not (func.is_view or func in self.ALIASES):
            self.count(output if func.overloadpacket.__name__ in self.FACTORIES else (args, kwargs, output))
        return output


class Launches(StepCount):
    """Counts what a GPU's host launches: every operator except views and aliases (which launch no kernel) and reads
    of a value on the host (`_local_scalar_dense`: the optimizer's step counts), and each Triton kernel."""

    HOST_ONLY = {torch.ops.aten._local_scalar_dense.default}

    def __init__(self):
        super().__init__()
        self.launches = 0

    def kernel(self, args) -> None:
        self.launches += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func in self.ALIASES or func in self.HOST_ONLY):
            self.launches += 1
        return func(*args, **(kwargs or {}))


class MetaLaunch:
    """A Triton kernel of focal_sdpa on the meta device, where nothing runs: its launch (`kernel[grid](*args,
    **meta)`) does nothing but add itself to the innermost count entered (`StepCount`: its tensor arguments as read
    and written for `Traffic`, one launch for `Launches`). The kernels only read their inputs and write into tensors
    their callers allocated, so the memory a step holds is what those allocations hold."""

    KERNELS = ("_tuned_forward", "_tuned_backward", "_gathered_attention_forward", "_gathered_attention_backward")

    def __getitem__(self, grid):
        return self.launch

    @staticmethod
    def launch(*args, **meta):
        if StepCount.active:
            StepCount.active[-1].kernel(args)

    @classmethod
    @contextlib.contextmanager
    def replacing_kernels(cls):
        """focal_sdpa's Triton kernels (`focal_hf.triton_attention`, where Triton is installed) replaced by
        `MetaLaunch` within."""
        try:
            from focal_hf import triton_attention
        except ImportError:  # (no Triton: focal_sdpa does without its kernels)
            yield
            return
        kernels = {name: getattr(triton_attention, name) for name in cls.KERNELS}
        try:
            for name in cls.KERNELS:
                setattr(triton_attention, name, cls())
            yield
        finally:
            for name, kernel in kernels.items():
                setattr(triton_attention, name, kernel)


def training_step_traffic(model: torch.nn.Module, batch_size: int, image_size: int, device: str = "meta") -> int:
    """Bytes read and written (`Traffic`) by one bf16-autocast training step of `model` with an existing AdamW
    state."""
    step, _ = prepared_step(model, batch_size, image_size, device)
    with Traffic() as traffic:
        step()
    return traffic.bytes


def training_step_launches(model: torch.nn.Module, batch_size: int, image_size: int, device: str = "meta") -> int:
    """Launches (`Launches`) of one bf16-autocast training step of `model` after a first one, which creates the AdamW
    state and the key layouts that Focal models keep."""
    step, _ = prepared_step(model, batch_size, image_size, device)
    with Launches() as launches:
        step()
    return launches.launches


# what `main` estimates, by option: the measure, its title and unit as printed, its JSON key, scale and decimals
MEASURES = {
    "peak": (training_step_peak, "peak memory", "peak MiB, less weights", "peak_mib", 2**20, 0),
    "traffic": (training_step_traffic, "memory traffic", "GB read and written", "traffic_gb", 1e9, 1),
    "launches": (training_step_launches, "launches", "operators and Triton kernels but views", "launches", 1, 0),
}


def estimate(
    name: str,
    batch_size: int,
    image_size: int,
    without: tuple[str, ...] = (),
    measure=training_step_peak,
    checkpointing: bool = False,
):
    """`measure` (a value of `MEASURES`) of a `benchmark.py` model (Focal models without the mechanisms named in
    `without`; with activation checkpointing if asked) on the meta device, SDPA and focal_sdpa as on a CUDA GPU."""
    with torch.device("meta"):
        model = build_model(name, image_size, without=without)
    if checkpointing:
        # the checkpoint runs each block again in the backward pass under the autocast state of its forward pass;
        # the stand-in, a function mode, is not active in the backward pass: the recomputation enters it
        recompute_under_autocast = {
            "use_reentrant": False,
            "context_fn": lambda: (contextlib.nullcontext(), Autocast()),
        }
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=recompute_under_autocast)
    sdpa, triton_runs_on = F.scaled_dot_product_attention, modeling_focal.triton_runs_on
    F.scaled_dot_product_attention = memory_efficient_sdpa
    modeling_focal.triton_runs_on = lambda tensor: tensor.is_meta  # (the meta device as an NVIDIA GPU from Ampere)
    try:
        with MetaLaunch.replacing_kernels():
            return measure(model, batch_size, image_size)
    finally:
        F.scaled_dot_product_attention, modeling_focal.triton_runs_on = sdpa, triton_runs_on


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--image-sizes", nargs="+", type=positive_int, default=[224, 448])
    parser.add_argument(
        "--without",
        nargs="+",
        default=[],
        choices=sorted(MECHANISMS),
        help="turn off these mechanisms of the Focal models (benchmark.py's; regathered-keys is the one for memory)",
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--traffic",
        action="store_true",
        help="estimate the bytes the step's operators read and write (GB) instead of its peak memory",
    )
    what.add_argument(
        "--launches",
        action="store_true",
        help="count what the step launches on a GPU (operators but views, and Triton kernels) instead",
    )
    parser.add_argument(
        "--checkpointing",
        action="store_true",
        help="with activation checkpointing (`activation_checkpointing_enable()`: each block run again in backward)",
    )
    parser.add_argument(
        "--json", help="also write the estimates (MiB; GB with --traffic; counts with --launches) to this JSON file"
    )
    args = parser.parse_args()
    models = [REFERENCE] + [name for name in args.models if name != REFERENCE]
    results = []
    without = tuple(args.without)
    measure, title, unit, key, scale, decimals = MEASURES[
        "traffic" if args.traffic else "launches" if args.launches else "peak"
    ]
    print(
        f"estimated {title} of a bf16 training step on a CUDA GPU, batch {args.batch_size} ({unit})"
        + (f"; Focal models without {', '.join(without)}" if without else "")
        + ("; activation checkpointing" if args.checkpointing else "")
        + ("" if modeling_focal.triton_gathered_attention else "; without Triton (focal_sdpa without its kernels)")
    )
    print("| model | " + " | ".join(f"{size} px" for size in args.image_sizes) + " |")
    print("| --- |" + " --- |" * len(args.image_sizes))
    checkpointing = args.checkpointing
    reference = {
        size: estimate(REFERENCE, args.batch_size, size, (), measure, checkpointing) for size in args.image_sizes
    }
    for name in models:
        cells = []
        for size in args.image_sizes:
            figure = (
                reference[size]
                if name == REFERENCE
                else estimate(name, args.batch_size, size, without, measure, checkpointing)
            )
            result = {
                "model": name,
                "image_size": size,
                "batch_size": args.batch_size,
                "without": list(without),
                "checkpointing": checkpointing,
            }
            results.append({**result, key: figure / scale})
            cells.append(f"{figure / scale:,.{decimals}f} ({figure / reference[size]:.2f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
