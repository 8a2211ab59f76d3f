"""Where a bf16 training step (or inference) of Focal-T goes on a GPU, beside transformers' Swin-T:

1. the host's time to issue each phase of the step (forward, backward, optimizer) against the step's time: when the
   two are close, the GPU waits for the host, and fewer operators or cheaper Python, not faster kernels, make the step
   faster;
2. the host's time by function (cProfile, self time, one step): Python functions, and torch's operators as the
   built-in methods that call them; the backward pass runs on the calling thread here, so that the Python it calls
   back (custom ops' backward, the Triton launches) shows too;
3. the top CUDA kernels (torch.profiler);
4. each time the host waited for the GPU in one step (`torch.cuda.set_sync_debug_mode`), by where it was called: one
   such wait a step makes the host issue the rest of the step only once the GPU has caught up, so host and GPU time
   add up instead of overlapping.

    python benchmarks/profile_gpu.py [--modes train-64 infer-1] [--image-size 224] [--without NAME ...] [--rows 25]

Steps as `benchmark.py --dtype bf16` times them (`--modes`: its modes; inference has one phase, with bf16 weights).
`--without`: the Focal models without these mechanisms (benchmark.py's names). `--device cpu` runs the same on the
CPU, where host and device are one (to try the script without a GPU; table 3 then lists operators by CPU time)."""

import argparse
import cProfile
import pstats
import statistics
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
from benchmark import MECHANISMS, REFERENCE, build_model, make_phases, mode_type, require_cuda
from torch.profiler import ProfilerActivity, profile

MODEL_FILES = ("modeling_", "triton_attention")  # (the files whose functions the cumulative table lists)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["swin-tiny", "focal-tiny"])
    parser.add_argument("--modes", nargs="+", type=mode_type, default=["train-64"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rows", type=int, default=25, help="rows of the function and kernel tables")
    parser.add_argument("--without", nargs="+", default=[], choices=sorted(MECHANISMS))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    if args.device == "cuda":
        require_cuda("profile_gpu.py")
    for mode in args.modes:
        for name in args.models:
            without = tuple(args.without) if name != REFERENCE else ()
            model = build_model(name, args.image_size, without=without)
            print(
                f"\n=== {name}{' without ' + ', '.join(without) if without else ''}, {mode}, {args.image_size} px, "
                f"bf16, {args.device}"
            )
            phases = make_phases(model, mode, args.image_size, args.device, "bf16")
            for _ in range(3):  # warm-up (Triton's tuning, the caching allocator, the optimizer's state)
                run(phases)
            print(phase_table(phases, args.device))
            print(host_functions(phases, args.rows))
            print(device_operators(phases, args.device, args.rows))
            print(host_synchronisations(phases, args.device, args.rows))
            del model, phases
            if args.device == "cuda":
                torch.cuda.empty_cache()


def run(phases: dict) -> None:
    for phase in phases.values():
        phase()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def phase_table(phases: dict, device: str, steps: int = 5) -> str:
    """The median over `steps` steps of each phase's time on the host (until the call returns: for a GPU, the time
    to issue its work) and of the step's time until the device has finished, in ms."""
    issued = {name: [] for name in phases}
    totals = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        for name, phase in phases.items():
            begin = time.perf_counter()
            phase()
            issued[name].append(time.perf_counter() - begin)
        synchronize(device)
        totals.append(time.perf_counter() - start)
    cells = [f"{name} {statistics.median(times) * 1e3:.1f}" for name, times in issued.items()]
    host = sum(statistics.median(times) for times in issued.values())
    return (
        f"step {statistics.median(totals) * 1e3:.1f} ms; on the host (ms, median of {steps}): {', '.join(cells)}, "
        f"together {host * 1e3:.1f}"
    )


def host_functions(phases: dict, rows: int) -> str:
    """The `rows` functions with the most self time on the host in one step (cProfile), the backward pass on the
    calling thread (not the autograd engine's device threads, which cProfile does not see); then the model's own
    functions (those of `modeling_*.py` and `triton_attention.py`) with the most cumulative time: what each part of
    the model costs the host, the operators it calls included."""
    profiler = cProfile.Profile()
    with torch.autograd.set_multithreading_enabled(False):
        profiler.enable()
        run(phases)
        profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, function) -> (primitive calls, calls, self, cumulative, ...)
    total = sum(entry[2] for entry in stats.values())
    lines = [f"host time by function (cProfile, {total * 1e3:.1f} ms in all; self ms, calls, function):"]
    for (file, line, function), (_, calls, self_time, _, _) in sorted(
        stats.items(), key=lambda item: item[1][2], reverse=True
    )[:rows]:
        where = function if file == "~" else f"{function} ({Path(file).name}:{line})"
        lines.append(f"{self_time * 1e3:9.2f} {calls:6d}  {where}")
    lines.append("the model's functions by cumulative host time (ms, calls, function):")
    model = [(key, entry) for key, entry in stats.items() if Path(key[0]).name.startswith(MODEL_FILES)]
    for (file, line, function), (_, calls, _, cumulative, _) in sorted(
        model, key=lambda item: item[1][3], reverse=True
    )[:rows]:
        lines.append(f"{cumulative * 1e3:9.2f} {calls:6d}  {function} ({Path(file).name}:{line})")
    return "\n".join(lines)


def device_operators(phases: dict, device: str, rows: int) -> str:
    """The profiler's table of one step: the top CUDA kernels by CUDA time (on the CPU: operators by CPU time)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        run(phases)
        synchronize(device)
    key = "cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)


def host_synchronisations(phases: dict, device: str, rows: int) -> str:
    """Where the host waited for the GPU in one step (`torch.cuda.set_sync_debug_mode("warn")`: a copy to the host,
    `.item()`, `nonzero`, a copy from pageable host memory, an explicit synchronisation), the backward pass on the
    calling thread: the count, and up to `rows` places as the innermost frame outside torch and the innermost
    frame."""
    if device != "cuda":
        return "host synchronisations: not measured on the CPU"
    places = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if not str(message).startswith("called a synchronizing CUDA operation"):  # (not the mode's own notice)
            return
        stack = [frame for frame in traceback.extract_stack()[:-1] if Path(frame.filename).name != "warnings.py"]
        outside = [frame for frame in stack if "/torch/" not in frame.filename]
        where = [f"{Path(frame.filename).name}:{frame.lineno} {frame.name}" for frame in (outside[-1], stack[-1])]
        places[f"{' <- '.join(where)}: {str(message).splitlines()[0][:80]}"] += 1

    with warnings.catch_warnings(), torch.autograd.set_multithreading_enabled(False):
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run(phases)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    lines = [f"host synchronisations in one step: {places.total()}"]
    lines += [f"{count:6d}  {place}" for place, count in places.most_common(rows)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
