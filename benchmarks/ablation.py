"""What speed and memory mechanisms are worth, measured in one process: a Focal model with them and a copy without
them (same weights; `benchmark.py`'s `--without` names), their steps interleaved (A B B A ...), so that the
machine's drift and the heap's state affect both alike.

    python benchmarks/ablation.py --without inference-bias-cache            # Focal-T; infer-1, infer-8, train-8
    python benchmarks/ablation.py --model focal-fast-tiny --without cpu-chunking --modes infer-8 --steps 30
    python benchmarks/ablation.py --device cuda --dtype bf16 --without regathered-keys --modes train-64
    mkdir -p /tmp/before && git archive 0143432 src/focal_hf | tar -x -C /tmp/before   # another version, then:
    python benchmarks/ablation.py --device cuda --dtype bf16 --against /tmp/before/src/focal_hf --modes train-64
    python benchmarks/ablation.py --device cuda --dtype bf16 --without triton-kernels --modes train-64 infer-128
    python benchmarks/ablation.py --attention sdpa --modes infer-8           # another attention implementation
    python benchmarks/ablation.py --against /tmp/before/src/focal_hf --exported --modes infer-2  # exported programs

For each mode it prints both speeds (medians) and the speed-up the mechanisms give: the median over step pairs of
(time without) / (time with), with its interquartile range; a mechanism whose range lies above 1.03 is worth more
than 3 %. On CUDA (steps timed between synchronisations; precision as `benchmark.py --dtype`) it also prints each
model's peak memory of a training step, over what it held before; on CPU peak memory needs a process per
measurement (`benchmark.py --without`).

`--against DIR` compares this version of the package with another instead (DIR: that version's `focal_hf` folder),
imported beside it as `focal_hf_other`, its model built with the same weights and run with its own default
attention (registered as "focal_sdpa_other"); the columns are then this version and the other, the speed-up this
version's. (Importing it maps transformers' Auto classes to its classes; this script does not use them.)

`--exported` compares the two as `torch.export` programs instead (exported with symbolic batch size, height and
width from an example at twice the image size, and run through their `.module()`; inference modes only): what a
change is worth to exported and ONNX deployments, whose graphs compute the key layouts on every call.

`--attention NAME` compares the model run with another attention implementation (any registered with transformers'
`AttentionInterface`) with the same model run with the default `focal_sdpa`; the columns are then NAME and
focal_sdpa, the speed-up NAME's.

On CUDA it finally prints the launch configurations that `triton.autotune` chose for focal_sdpa's Triton kernels.
Versions before 2026-11-28 register their kernels as an op, once per process by name: two such versions compared
(this one older too) run the same kernels unless one's op is renamed (docs/performance.md, "Measuring").
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

from benchmark import (
    DEFAULTS,
    MECHANISMS,
    MODELS,
    REFERENCE,
    build_model,
    make_step,
    mode_type,
    positive_int,
    require_cuda,
    turn_off,
)


def paired_steps(steps: dict, count: int, synchronize=None) -> dict[str, list[float]]:
    """Run the named step functions `count` times each, alternating their order (ABBA), and return their times
    (each between two calls of `synchronize`, if given: a device's queue drained)."""
    names = list(steps)
    times = {name: [] for name in names}
    synchronize = synchronize or (lambda: None)
    for index in range(count):
        for name in names if index % 2 == 0 else reversed(names):
            synchronize()
            begin = time.perf_counter()
            steps[name]()
            synchronize()
            times[name].append(time.perf_counter() - begin)
    return times


def peak_memory(step) -> float:
    """MiB that one more `step` on the CUDA device takes at its peak over what was allocated before it."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def quartiles(values: list[float]) -> tuple[float, float, float]:
    first, median, third = statistics.quantiles(values, n=4, method="inclusive")
    return first, median, third


def import_other_version(package_dir: str):
    """The `focal_hf` package in `package_dir` imported as `focal_hf_other`, its default attention function
    registered as "focal_sdpa_other" (this version's stays "focal_sdpa")."""
    import atexit
    import importlib
    import os
    import shutil
    import sys
    import tempfile

    from transformers import AttentionInterface

    from focal_hf import modeling_focal

    if not os.path.isfile(os.path.join(package_dir, "modeling_focal.py")):
        raise SystemExit(f"--against: expected a focal_hf package folder (with modeling_focal.py), got {package_dir}")
    links = tempfile.mkdtemp(prefix="focal_hf_other_")
    atexit.register(shutil.rmtree, links, ignore_errors=True)  # (the package may import its modules until then)
    os.symlink(os.path.abspath(package_dir), os.path.join(links, "focal_hf_other"))
    sys.path.insert(0, links)
    other = importlib.import_module("focal_hf_other")
    AttentionInterface.register("focal_sdpa_other", other.modeling_focal.focal_sdpa_attention)
    AttentionInterface.register("focal_sdpa", modeling_focal.focal_sdpa_attention)
    return other


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="focal-tiny", choices=[name for name in MODELS if name != REFERENCE])
    compared = parser.add_mutually_exclusive_group(required=True)
    compared.add_argument("--without", nargs="+", choices=sorted(MECHANISMS))
    compared.add_argument("--against", metavar="DIR", help="another version's focal_hf package folder")
    compared.add_argument("--attention", metavar="NAME", help="an attention implementation to set against focal_sdpa")
    parser.add_argument("--modes", nargs="+", type=mode_type, help="default: as benchmark.py on the device")
    parser.add_argument(
        "--exported", action="store_true", help="compare their torch.export programs (inference modes only)"
    )
    parser.add_argument("--image-size", type=positive_int, default=224)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="as benchmark.py's")
    parser.add_argument("--steps", type=positive_int, default=20, help="timed steps of each model per mode")
    parser.add_argument("--warmup", type=positive_int, default=2)
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads on CPU")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps: expected at least 2 (the spread needs pairs)")

    import torch

    if args.device == "cuda":
        require_cuda("ablation.py")
    modes = args.modes or DEFAULTS[args.device]["modes"]
    if args.exported:
        if args.modes and any(mode.startswith("train") for mode in args.modes):
            parser.error(f"--exported: expected inference modes (infer-N) only, got {' '.join(args.modes)}")
        modes = [mode for mode in modes if mode.startswith("infer")]
    cuda = args.device == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with_them = build_model(args.model, args.image_size)
    if args.against:
        other = import_other_version(args.against)
        config = other.official_config(args.model, image_size=args.image_size, num_labels=1000)
        without = other.FocalForImageClassification(config)
        without.load_state_dict(with_them.state_dict())
        without.set_attn_implementation("focal_sdpa_other")
        compared = f"this version and the one in {args.against}"
        columns = ("this", "other", "speed-up of this version")
    elif args.attention:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if args.attention != "eager" and args.attention not in ALL_ATTENTION_FUNCTIONS:
            known = ", ".join(["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()])
            parser.error(f"--attention: expected a registered attention implementation ({known}), got {args.attention}")
        without = copy.deepcopy(with_them)
        with_them.set_attn_implementation(args.attention)
        compared = f"attention {args.attention} and focal_sdpa"
        columns = (args.attention, "focal_sdpa", f"speed-up of {args.attention}")
    else:
        without = turn_off(copy.deepcopy(with_them), tuple(args.without))
        compared = f"with and without {', '.join(args.without)}"
        columns = ("with", "without", "speed-up from them")
    models = {"with": with_them, "without": without}
    where = torch.cuda.get_device_name() if cuda else f"{args.threads} threads"
    print(
        f"{args.model}, {args.image_size} px, {args.device} ({where}), {args.dtype}, torch {torch.__version__}: "
        f"{compared}{'; as exported programs' if args.exported else ''}; medians of {args.steps} interleaved steps each"
    )
    memory_columns = f" | peak MiB {columns[0]} | peak MiB {columns[1]}" if cuda else ""
    print(f"mode     | {columns[0]} (img/s) | {columns[1]} (img/s) | {columns[2]} (IQR){memory_columns}")
    for mode in modes:
        batch_size = int(mode.split("-")[1])
        steps = {  # (on copies: a bf16 inference mode casts its model's weights)
            name: make_step(
                copy.deepcopy(model), mode, args.image_size, args.device, args.dtype, exported=args.exported
            )
            for name, model in models.items()
        }
        synchronize = torch.cuda.synchronize if cuda else None
        paired_steps(steps, args.warmup, synchronize)
        times = paired_steps(steps, args.steps, synchronize)
        speeds = {name: batch_size / statistics.median(values) for name, values in times.items()}
        first, median, third = quartiles([b / a for a, b in zip(times["with"], times["without"], strict=True)])
        memory = ""
        if cuda and mode.startswith("train"):
            memory = f" | {peak_memory(steps['with']):13.0f} | {peak_memory(steps['without']):16.0f}"
        print(
            f"{mode:8s} | {speeds['with']:12.2f} | {speeds['without']:15.2f} | {median:.3f}x ({first:.3f}-{third:.3f})"
            + memory,
            flush=True,
        )
    from focal_hf import modeling_focal

    if cuda and modeling_focal.triton_gathered_attention is not None:
        from focal_hf.triton_attention import tuned_configs

        for kernel, chosen in tuned_configs().items():
            for shape, config in chosen.items():
                print(f"Triton {kernel} kernel {shape}: {config}")


if __name__ == "__main__":
    main()
