"""Compile focal_sdpa's Triton kernels (`focal_hf.triton_attention`) in every launch configuration for a CUDA GPU,
without one, and print each one's registers and spills per thread (Triton compiles for any target it is told of):

    python benchmarks/triton_registers.py                       # sm_90 (H100, H200), bf16, Focal-T's first stage
    python benchmarks/triton_registers.py --capability 80 --window-area 144 --keys 300 --heads 4
    python benchmarks/triton_registers.py --scaling-type fp64   # the float argument as torch.compile passes it
"""

import argparse
import functools
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton

from focal_hf.triton_attention import (
    BACKWARD_CONFIGS,
    FORWARD_CONFIGS,
    INTERPRETED,
    _gathered_attention_backward,
    _gathered_attention_forward,
    _launch_arguments,
    describe,
)

LOW_PRECISION = {"query_ptr", "key_ptr", "value_ptr", "bias_ptr", "output_ptr", "grad_output_ptr"}  # (else float32)


def compile_for_gpu(
    capability: int,
    dtype: torch.dtype,
    window_area: int,
    num_keys: int,
    num_heads: int,
    head_dim: int,
    scaling_type: str = "fp32",
):
    """Both kernels compiled in every launch configuration for a CUDA GPU of compute capability `capability` (e.g. 90:
    H100, H200), without one: Triton compiles for any target it is told of. `scaling_type`: the Triton type of the
    float argument `scaling`, "fp32" as Triton's launcher passes a Python float, "fp64" as the code that
    `torch.compile` generates does. Yields (kernel name, configuration, compiled kernel)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRETED:
        raise RuntimeError("the kernels are interpreted (TRITON_INTERPRET=1): unset it to compile them")
    meta = functools.partial(torch.empty, device="meta")
    projections = meta(1, window_area, 3 * num_heads * head_dim, dtype=dtype)
    bias = meta(1, num_heads, window_area, num_keys)
    _, _, constants = _launch_arguments(projections, bias, meta(1, num_keys, dtype=torch.int64), num_heads)
    element = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    for name, kernel, configs in (
        ("forward", _gathered_attention_forward, FORWARD_CONFIGS),
        ("backward", _gathered_attention_backward, BACKWARD_CONFIGS),
    ):
        signature = {argument: _argument_type(argument, element, scaling_type) for argument in kernel.arg_names}
        signature.update(dict.fromkeys([*constants, *configs[0].kwargs], "constexpr"))
        for config in configs:
            values = {**constants, **config.kwargs}
            constexprs = {(kernel.arg_names.index(argument),): value for argument, value in values.items()}
            options = {"num_warps": config.num_warps}
            target = GPUTarget("cuda", capability, 32)
            yield name, config, triton.compile(ASTSource(kernel, signature, constexprs), target=target, options=options)


def _argument_type(argument: str, element: str, scaling_type: str) -> str:
    """A kernel argument's Triton type (the kernels' scalars: `scaling` of `scaling_type`, int32 sizes)."""
    if argument.endswith("_ptr"):
        return f"*{element}" if argument in LOW_PRECISION else "*i64" if argument == "key_index_ptr" else "*fp32"
    return scaling_type if argument == "scaling" else "i32"


def resource_usage(compiled) -> tuple[int, int]:
    """Registers per thread and bytes spilled to local memory per thread of a compiled CUDA kernel (by the
    `cuobjdump` that Triton ships)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        report = subprocess.run([tool, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    registers, stack = re.search(r"REG:(\d+) STACK:(\d+)", report).groups()
    return int(registers), int(stack)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capability", type=int, default=90, help="CUDA compute capability, e.g. 80, 90 (default)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--window-area", type=int, default=49)
    parser.add_argument("--keys", type=int, default=224)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument(
        "--scaling-type",
        default="fp32",
        choices=["fp32", "fp64"],
        help="the float argument's type: fp32 as Triton's launcher passes it (default), fp64 as torch.compile does",
    )
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    shape = (args.window_area, args.keys, args.heads, args.head_dim)
    print(
        f"sm_{args.capability}, {args.dtype}, {args.window_area} queries, {args.keys} keys, {args.heads} heads of "
        f"{args.head_dim}, scaling {args.scaling_type}"
    )
    for name, config, compiled in compile_for_gpu(args.capability, dtype, *shape, args.scaling_type):
        registers, stack = resource_usage(compiled)
        print(f"{name} | {describe(config)} | {registers} registers | {stack} bytes spilled", flush=True)


if __name__ == "__main__":
    main()
