"""Speed and memory of Focal models against transformers' Swin-T, measured in one run.

    python benchmarks/benchmark.py                                 # CPU, fp32, 2 threads, 224 px
    python benchmarks/benchmark.py --device cuda --dtype bf16 --compile --json results.json

Modes: `infer-N` is inference at batch N (`torch.no_grad`, eval mode); `train-N` a training step at batch N
(forward, backward and AdamW, train mode), whose peak memory is reported too: on CUDA the peak allocated, on CPU the
growth of the process's peak resident memory, both over what the process held once the model was built (so
gradients, optimizer state, activations and workspace). Defaults: on CPU infer-1, infer-8 and train-8 at 224 px,
3 interleaved rounds; on CUDA infer-1, infer-128 and train-64 at 224 and 448 px, 1 round.

Precision: `fp32` everywhere, or `bf16`: inference with the weights cast to bf16, training with fp32 weights under
`torch.autocast(dtype=torch.bfloat16)` (mixed precision, as fine-tuning runs). On CUDA the optimizer is the fused
AdamW (Trainer's default), on CPU the default one.

On CPU every measurement runs in a fresh process, since peak resident memory cannot be reset; on CUDA the
measurements of one model share a process (peak memory is reset and caches emptied between them), so start-up is
paid once per model. Each measurement warms up before timing (CUDA timing by events). Models are interleaved round
by round; the table shows medians over the rounds and each model's ratio to Swin-T at the same image size (compiled
rows: to compiled Swin-T). `--compile` adds rows for Swin-T and Focal-T (or the models named) under `torch.compile`,
at the first image size. A measurement that runs out of memory shows as OOM; other failures are listed and make the
exit status non-zero. With `--json` the raw results are (re)written after every process, so an interrupted run
(e.g. SIGTERM from `timeout`) still leaves them, and the table of what was measured is printed.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import types

MODELS = ["swin-tiny", "focal-tiny", "focal-fast-tiny", "focal-small", "focal-base"]
REFERENCE = "swin-tiny"
COMPILED_BY_DEFAULT = ["swin-tiny", "focal-tiny"]
DEFAULTS = {  # per device: modes, image sizes, rounds, timed iterations, warm-up steps, threads
    "cpu": dict(
        modes=["infer-1", "infer-8", "train-8"], image_sizes=[224], rounds=3, iterations=5, warmup=2, threads=2
    ),
    "cuda": dict(
        modes=["infer-1", "infer-128", "train-64"],
        image_sizes=[224, 448],
        rounds=1,
        iterations=10,
        warmup=3,
        threads=None,
    ),
}
# speed and memory mechanisms that `--without` turns off (to measure what each is worth)
MECHANISMS = {
    "cpu-attention-op": "the custom op of focal_sdpa on CPU (then: torch SDPA on the folded windows, as 'sdpa')",
    "cpu-chunking": "blocks taking a few images at a time on CPU without autograd",
    "inference-bias-cache": "the attention bias kept between forward passes without autograd",
    "regathered-keys": "off the CPU, the gathered keys gathered again for the backward pass (then: kept; implies "
    "triton-kernels)",
    "triton-kernels": "focal_sdpa's fused Triton kernels on NVIDIA GPUs in bf16/fp16 (then: torch SDPA on the folded "
    "windows)",
}
MODE_PATTERN = re.compile(r"^(infer|train)-([1-9][0-9]*)$")


def mode_type(text: str) -> str:
    if not MODE_PATTERN.match(text):
        raise argparse.ArgumentTypeError(f"expected infer-N or train-N with a batch size N >= 1, got {text!r}")
    return text


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def require_cuda(script: str, asked: str = "--device cuda") -> None:
    """Exit with one line unless torch sees a CUDA GPU (`--device cuda` of the scripts here, or what `asked` says)."""
    import torch

    if not torch.cuda.is_available():
        sys.exit(f"{script}: {asked}, but torch {torch.__version__} sees no CUDA GPU here")


def build_model(name: str, image_size: int = 224, num_labels: int = 1000, without: tuple[str, ...] = ()):
    """An ImageNet classifier with random weights: an official Focal architecture or transformers' Swin-T; Focal
    models with the speed and memory mechanisms named in `without` (`MECHANISMS`) turned off (`turn_off`)."""
    if name == "swin-tiny":
        from transformers import SwinConfig, SwinForImageClassification

        return SwinForImageClassification(SwinConfig(image_size=image_size, num_labels=num_labels))
    from focal_hf import FocalForImageClassification, official_config

    model = FocalForImageClassification(official_config(name, image_size=image_size, num_labels=num_labels))
    return turn_off(model, without)


def turn_off(model, without: tuple[str, ...]):
    """`model` (a Focal model) with the speed and memory mechanisms named in `without` turned off on this instance
    only (other models of the process keep them)."""
    from focal_hf import modeling_focal

    if "cpu-attention-op" in without:
        model.set_attn_implementation("sdpa")  # (which keeps the gathered keys too)
    elif "regathered-keys" in without or "triton-kernels" in without:
        from transformers import AttentionInterface

        name, attention = (
            ("focal_sdpa_keeping_keys", folded_sdpa_keeping_keys)
            if "regathered-keys" in without
            else ("focal_sdpa_without_triton", modeling_focal.folded_sdpa_attention)
        )
        AttentionInterface.register(name, focal_sdpa_off_the_cpu(attention))
        model.set_attn_implementation(name)
    for module in model.modules():
        if "cpu-chunking" in without and isinstance(module, modeling_focal.FocalLayer):
            module.forward = module.block  # (the chunking lives in `forward`)
        if "inference-bias-cache" in without and isinstance(module, modeling_focal.FocalAttentionBase):
            module.cached_attention_bias = types.MethodType(_uncached_attention_bias, module)
    return model


def focal_sdpa_off_the_cpu(attention):
    """`focal_sdpa` with `attention(query, key, value, key_index, bias, scaling, dropout) -> output` in place of its
    path off the CPU: `--without regathered-keys` (`folded_sdpa_keeping_keys`) and `--without triton-kernels`
    (always `modeling_focal.folded_sdpa_attention`)."""
    from focal_hf import modeling_focal

    def focal_sdpa(module, query, key, value, key_index, attention_mask, scaling, dropout=0.0, **kwargs):
        if query.device.type == "cpu":
            return modeling_focal.focal_sdpa_attention(
                module, query, key, value, key_index, attention_mask, scaling, dropout, **kwargs
            )
        return attention(query, key, value, key_index, attention_mask, scaling, dropout), None

    focal_sdpa.gathers_keys = True
    return focal_sdpa


def folded_sdpa_keeping_keys(query, key, value, key_index, bias, scaling, dropout):
    """SDPA on the folded windows that keeps the gathered keys and values for the backward pass, as focal_sdpa did
    before it gathered them again."""
    import torch.nn.functional as F

    from focal_hf import modeling_focal

    num_heads = bias.shape[1]
    query, key, value, bias = modeling_focal.fold_windows(query, key, value, key_index, bias)
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout, scale=scaling)
    return modeling_focal.unfold_windows(output.transpose(1, 2), num_heads)


def _uncached_attention_bias(self, layout, dtype):
    return self.attention_bias(layout).to(dtype)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_step(
    model, mode: str, image_size: int, device: str, dtype: str, compiled: bool = False, exported: bool = False
):
    """`model` (freshly built on the CPU) moved to `device`, and one step of `mode` for it (`make_phases`, run in
    order)."""
    phases = make_phases(model, mode, image_size, device, dtype, compiled, exported)

    def step():
        for phase in phases.values():
            phase()

    return step


def make_phases(
    model, mode: str, image_size: int, device: str, dtype: str, compiled: bool = False, exported: bool = False
) -> dict:
    """`model` (freshly built on the CPU) moved to `device`, and the phases of one step of `mode` for it, in order,
    as functions: inference ("forward": no autograd, eval mode; bf16 weights with `dtype` bf16; with `exported` the
    model's `torch.export` program, `exported_for_every_size`) or a training step ("forward", "backward",
    "optimizer": train mode, AdamW, fused off the CPU; bf16 autocast with `dtype` bf16), on random images."""
    import torch

    training = mode.startswith("train")
    if exported and training:
        raise ValueError(f"exported programs run inference modes (infer-N) only, got {mode}")
    batch_size = int(mode.split("-")[1])
    half = dtype == "bf16"
    model = model.to(device).train(training)
    if half and not training:
        model = model.to(torch.bfloat16)
    if compiled:
        model = torch.compile(model, dynamic=False)
    input_dtype = torch.bfloat16 if half and not training else torch.float32
    if exported:
        model = exported_for_every_size(model, image_size, device, input_dtype)
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, device=device, dtype=input_dtype)
    if not training:

        def infer():
            with torch.no_grad():
                model(pixel_values)

        return {"forward": infer}
    labels = torch.randint(0, 1000, (batch_size,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device != "cpu")
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=half)
    losses = []

    def forward():
        with autocast:
            losses.append(model(pixel_values, labels=labels).loss)

    def backward():
        losses.pop().backward()

    def update():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"forward": forward, "backward": backward, "optimizer": update}


def exported_for_every_size(model, image_size: int, device: str, dtype):
    """`model`'s `torch.export` program with symbolic batch size, height and width, exported from an example at twice
    `image_size` (where every stage of a model configured for `image_size` is at least two windows wide), as a
    module."""
    import torch
    from torch.export import Dim

    example = torch.randn(2, 3, 2 * image_size, 2 * image_size, device=device, dtype=dtype)
    sizes = {"pixel_values": {0: Dim("batch"), 2: Dim("height", min=32), 3: Dim("width", min=32)}}
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=sizes).module()


def measure(model, spec: dict, device: str, dtype: str, iterations: int, warmup: int) -> dict:
    """Time `model` (freshly built on the CPU) in one mode in this process: images/s and peak memory (MiB)."""
    import torch

    batch_size = int(spec["mode"].split("-")[1])
    step = make_step(model, spec["mode"], spec["image_size"], device, dtype, spec["compiled"])
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        for _ in range(warmup):
            step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iterations):
            step()
        end.record()
        end.synchronize()
        elapsed = start.elapsed_time(end) / 1000
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        baseline = _rss_bytes()
        for _ in range(warmup):
            step()
        begin = time.perf_counter()
        for _ in range(iterations):
            step()
        elapsed = time.perf_counter() - begin
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {"images_per_s": batch_size * iterations / elapsed, "peak_mib": max(peak, 0) / 2**20}


def worker(specs: list[dict], device: str, dtype: str, iterations: int, warmup: int) -> None:
    """Measure `specs` in order, printing one JSON line per measurement (an out-of-memory one as `"error": "OOM"`)."""
    import torch

    built = {}  # one model per architecture and image size, built on the CPU once, copied for all but its last use
    for index, spec in enumerate(specs):
        key = (spec["model"], spec["image_size"])
        if key not in built:
            built = {key: build_model(*key, without=tuple(spec.get("without", ())))}
        used_again = any((later["model"], later["image_size"]) == key for later in specs[index + 1 :])
        model = copy.deepcopy(built[key]) if used_again else built.pop(key)
        try:
            result = measure(model, spec, device, dtype, iterations, warmup)
        except torch.cuda.OutOfMemoryError:
            result = {"error": "OOM"}
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        if spec["compiled"]:
            torch._dynamo.reset()
        print(json.dumps({**spec, **result}), flush=True)


class Interrupted(Exception):
    pass


def _interrupt(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def run_worker(args, specs: list[dict], on_result) -> str | None:
    """Run `specs` in a fresh process, handing each result to `on_result`; returns an error message or None."""
    command = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--dtype", args.dtype]
    command += ["--iterations", str(args.iterations), "--warmup", str(args.warmup), "--worker", json.dumps(specs)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            for line in process.stdout:
                if line.startswith("{"):
                    on_result(json.loads(line))
            process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if process.returncode == 0:
            return None
        stderr.seek(0)
        return f"exit status {process.returncode}:\n{stderr.read()[-3000:]}"


def rows(args) -> list[tuple[str, bool]]:
    """The table's rows: (model, compiled)."""
    return [(name, False) for name in args.models] + [(name, True) for name in args.compile or []]


def jobs(args, round_index: int) -> list[list[dict]]:
    """The measurements of one round, grouped by process: one each on CPU, one model's all together on CUDA."""
    specs = [
        {
            "round": round_index + 1,
            "model": name,
            "compiled": compiled,
            "image_size": size,
            "mode": mode,
            "without": args.without,
        }
        for size in args.image_sizes
        for mode in args.modes
        for name, compiled in rows(args)
        if not compiled or size == args.image_sizes[0]
    ]
    if args.device == "cpu":
        return [[spec] for spec in specs]
    return [[spec for spec in specs if (spec["model"], spec["compiled"]) == row] for row in rows(args)]


def label(name: str, compiled: bool) -> str:
    return f"{name} compiled" if compiled else name


def print_table(args, results: list[dict], header: str) -> None:
    def median(name, compiled, size, mode, key):
        """The median over the rounds, "OOM" if it ran out of memory, None if not measured."""
        taken = [
            r
            for r in results
            if (r["model"], r["compiled"], r["image_size"], r["mode"]) == (name, compiled, size, mode)
        ]
        values = [r[key] for r in taken if key in r]
        if values:
            return statistics.median(values)
        return "OOM" if any(r.get("error") == "OOM" for r in taken) else None

    def cell(value, reference, digits):
        if value is None or isinstance(value, str):
            return f"{value or '-':>18s}"
        ratio = f"{value / reference:4.2f}x" if isinstance(reference, float) and reference > 0 else "  -  "
        return f"{value:10.{digits}f} ({ratio})"

    print(f"\n{header}")
    train_modes = [mode for mode in args.modes if mode.startswith("train")]
    columns = [f"{mode:>18s}" for mode in args.modes] + [f"{mode + ' peak MiB':>18s}" for mode in train_modes]
    for size in args.image_sizes:
        print(" | ".join([f"{f'{size} px':24s}", *columns]))
        for name, compiled in rows(args):
            if compiled and size != args.image_sizes[0]:
                continue
            cells = [f"{label(name, compiled):24s}"]
            for key, modes, digits in (("images_per_s", args.modes, 2), ("peak_mib", train_modes, 0)):
                for mode in modes:
                    value = median(name, compiled, size, mode, key)
                    cells.append(cell(value, median(REFERENCE, compiled, size, mode, key), digits))
            print(" | ".join(cells))


def write_json(path: str, payload) -> None:
    """`payload` as JSON at `path`, written whole or not at all (a temporary file in the same folder, then renamed)."""
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as handle:
        json.dump(payload, handle, indent=1)
    os.replace(handle.name, path)


def parse_args(argv=None) -> argparse.Namespace:
    """The options with the device's defaults filled in, Swin-T first among the (compiled) models."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS, help="models to compare (default: all)")
    parser.add_argument(
        "--modes",
        nargs="+",
        type=mode_type,
        help="infer-N / train-N (default: CPU infer-1 infer-8 train-8, CUDA infer-1 infer-128 train-64)",
    )
    parser.add_argument("--image-sizes", nargs="+", type=positive_int, help="default: CPU 224, CUDA 224 448")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: see precision above")
    parser.add_argument("--threads", type=positive_int, help="torch intra-op threads (default: 2 on CPU)")
    parser.add_argument(
        "--rounds", type=positive_int, help="interleaved rounds; medians shown (default: CPU 3, CUDA 1)"
    )
    parser.add_argument("--iterations", type=positive_int, help="timed steps per measurement (default: CPU 5, CUDA 10)")
    parser.add_argument("--warmup", type=non_negative_int, help="untimed steps first (default: CPU 2, CUDA 3)")
    parser.add_argument(
        "--compile",
        nargs="*",
        choices=MODELS,
        metavar="MODEL",
        help=f"also measure these models under torch.compile at the first image size (no names: {COMPILED_BY_DEFAULT})",
    )
    parser.add_argument(
        "--without",
        nargs="+",
        default=[],
        choices=sorted(MECHANISMS),
        help="turn off these speed and memory mechanisms of the Focal models: "
        + "; ".join(f"{name}: {what}" for name, what in MECHANISMS.items()),
    )
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.compile == []:  # --compile without names
        args.compile = list(COMPILED_BY_DEFAULT)
    args.models = [REFERENCE] + [name for name in args.models if name != REFERENCE]
    if args.compile:
        args.compile = [REFERENCE] + [name for name in args.compile if name != REFERENCE]
        from focal_hf import requirements

        if not requirements.TRACEABLE:  # compiled, a Focal model's forward would run uncompiled: no such rows
            print(
                f"--compile: torch {requirements.TORCH_VERSION} cannot trace Focal models (they need "
                f"{requirements.TRACING_REQUIREMENT}); only {REFERENCE} is measured compiled",
                file=sys.stderr,
            )
            args.compile = [REFERENCE]
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(json.loads(args.worker), args.device, args.dtype, args.iterations, args.warmup)
        return
    if args.device == "cuda":
        require_cuda("benchmark.py")

    import transformers

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{args.threads} threads"
    precision = {
        "fp32": "fp32",
        "bf16": "bf16 (inference: bf16 weights; training: fp32 weights under torch.autocast(bfloat16))",
    }[args.dtype]
    header = (
        f"{args.device} ({device_name}), {precision}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}; medians of {args.rounds} interleaved round(s) of {args.iterations} timed steps "
        f"after {args.warmup} warm-up; images/s and peak MiB (ratio to {REFERENCE} at the same size)"
        + (f"; Focal models without {', '.join(args.without)}" if args.without else "")
    )
    results, failures = [], []

    def on_result(result):
        results.append(result)
        value = "OOM" if "error" in result else f"{result['images_per_s']:9.2f} img/s {result['peak_mib']:8.0f} MiB"
        print(
            f"round {result['round']}/{args.rounds} {result['image_size']} px {result['mode']:9s} "
            f"{label(result['model'], result['compiled']):24s} {value}",
            file=sys.stderr,
            flush=True,
        )

    signal.signal(signal.SIGTERM, _interrupt)
    interrupted = None
    try:
        for round_index in range(args.rounds):
            for specs in jobs(args, round_index):
                error = run_worker(args, specs, on_result)
                if error:
                    failures.append(f"{specs[0]['model']} ({len(specs)} measurements from {specs[0]}): {error}")
                    print(f"FAILED {failures[-1]}", file=sys.stderr, flush=True)
                if args.json:
                    write_json(args.json, {"header": header, "results": results, "failures": failures})
    except (Interrupted, KeyboardInterrupt) as stop:
        interrupted = str(stop) or type(stop).__name__
    print_table(args, results, header)
    if args.json:
        write_json(args.json, {"header": header, "results": results, "failures": failures, "interrupted": interrupted})
    if interrupted:
        sys.exit(f"interrupted ({interrupted}): the table shows the measurements taken until then")
    if failures:
        sys.exit(f"{len(failures)} worker process(es) failed, see above")


if __name__ == "__main__":
    main()
