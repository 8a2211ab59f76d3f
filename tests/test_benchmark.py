"""The benchmark script: its refusal without a GPU, its argument checks, and one minimal CPU run end to end."""

import copy
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BENCHMARKS, environment_with_path, import_script

SCRIPT = BENCHMARKS / "benchmark.py"
SRC = Path(__file__).resolve().parents[1] / "src"


def run_script(*args, script: str = SCRIPT.name, **env):
    """Run one of the benchmark scripts (by default benchmark.py) on this checkout's `src`, offline, as a user runs it:
    Triton compiles rather than interprets."""
    return subprocess.run(
        [sys.executable, str(SCRIPT.parent / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment_with_path(SRC, HF_HUB_OFFLINE="1", TRITON_INTERPRET="0", **env),
    )


def test_cuda_without_a_gpu_is_refused_in_one_line():
    result = run_script("--device", "cuda", "--dtype", "bf16", CUDA_VISIBLE_DEVICES="")
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.strip().count("\n") == 0
    assert "--device cuda, but torch" in result.stderr and "sees no CUDA GPU here" in result.stderr


@pytest.fixture
def benchmark():
    return import_script("benchmark")


def test_measurements_are_grouped_one_per_process_on_cpu_and_by_model_on_cuda(benchmark):
    def groups(device, *extra):
        args = benchmark.parse_args(["--device", device, "--models", "focal-tiny", "--compile", *extra])
        return [
            [(s["model"], s["compiled"], s["image_size"], s["mode"]) for s in job] for job in benchmark.jobs(args, 0)
        ]

    cuda_modes = ("infer-1", "infer-128", "train-64")
    assert groups("cuda") == [
        [("swin-tiny", False, size, mode) for size in (224, 448) for mode in cuda_modes],
        [("focal-tiny", False, size, mode) for size in (224, 448) for mode in cuda_modes],
        [("swin-tiny", True, 224, mode) for mode in cuda_modes],
        [("focal-tiny", True, 224, mode) for mode in cuda_modes],
    ]
    assert groups("cpu", "--modes", "infer-1", "train-8") == [
        [("swin-tiny", False, 224, "infer-1")],
        [("focal-tiny", False, 224, "infer-1")],
        [("swin-tiny", True, 224, "infer-1")],
        [("focal-tiny", True, 224, "infer-1")],
        [("swin-tiny", False, 224, "train-8")],
        [("focal-tiny", False, 224, "train-8")],
        [("swin-tiny", True, 224, "train-8")],
        [("focal-tiny", True, 224, "train-8")],
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--modes", "infer-0"], "expected infer-N or train-N"),
        (["--modes", "train8"], "expected infer-N or train-N"),
        (["--image-sizes", "0"], "expected a positive integer"),
        (["--warmup", "-1"], "expected an integer >= 0"),
        (["--models", "focal-huge"], "invalid choice"),
    ],
)
def test_bad_arguments_are_explained(benchmark, args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        benchmark.main(args)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_cpu_run_end_to_end(tmp_path):
    output = tmp_path / "results.json"
    args = ["--models", "focal-tiny", "--modes", "infer-1", "--rounds", "1", "--iterations", "1", "--warmup", "0"]
    result = run_script(*args, "--json", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(output.read_text())
    assert payload["failures"] == [] and payload["interrupted"] is None
    measured = [(r["model"], r["compiled"], r["image_size"], r["mode"], r["round"]) for r in payload["results"]]
    assert measured == [("swin-tiny", False, 224, "infer-1", 1), ("focal-tiny", False, 224, "infer-1", 1)]
    assert all(r["images_per_s"] > 0 for r in payload["results"])
    lines = result.stdout.splitlines()
    assert lines[1].startswith("cpu (2 threads), fp32, torch ")
    assert lines[2].split("|")[0].strip() == "224 px" and lines[2].split("|")[1].strip() == "infer-1"
    assert lines[3].startswith("swin-tiny ") and lines[3].endswith("(1.00x)")
    assert lines[4].startswith("focal-tiny ") and lines[4].endswith("x)")


@pytest.mark.parametrize("traceable", [True, False])
def test_compiled_focal_rows_need_a_torch_that_traces_them(benchmark, monkeypatch, capsys, traceable):
    """On a torch older than `focal_hf.requirements.TRACING_REQUIREMENT` (2.9, say) `--compile`
    measures Swin-T alone, and says why, rather than a Focal model whose forward runs uncompiled."""
    from focal_hf import requirements

    monkeypatch.setattr(requirements, "TRACEABLE", traceable)
    args = benchmark.parse_args(["--device", "cuda", "--compile"])
    assert args.compile == (["swin-tiny", "focal-tiny"] if traceable else ["swin-tiny"])
    message = capsys.readouterr().err
    assert (f"cannot trace Focal models (they need {requirements.TRACING_REQUIREMENT})" in message) is not traceable


def test_table_shows_ratios_to_swin_at_the_same_size_and_out_of_memory(benchmark, capsys):
    args = benchmark.parse_args(
        ["--device", "cuda", "--models", "focal-tiny", "--modes", "infer-1", "train-64", "--compile", "focal-tiny"]
    )

    def result(model, size, mode, images_per_s, peak_mib=1.0, compiled=False, round=1):
        spec = {"round": round, "model": model, "compiled": compiled, "image_size": size, "mode": mode}
        return {**spec, "images_per_s": images_per_s, "peak_mib": peak_mib}

    results = [
        result("swin-tiny", 224, "infer-1", 100.0),
        result("swin-tiny", 224, "infer-1", 300.0, round=2),
        result("focal-tiny", 224, "infer-1", 100.0),
        result("focal-tiny", 224, "infer-1", 150.0, round=2),  # medians: 200 and 125
        result("swin-tiny", 224, "train-64", 1000.0, peak_mib=4000.0),
        result("focal-tiny", 224, "train-64", 900.0, peak_mib=5000.0),
        result("swin-tiny", 448, "infer-1", 50.0),
        result("focal-tiny", 448, "infer-1", 40.0),
        result("swin-tiny", 448, "train-64", 250.0, peak_mib=16000.0),
        {"round": 1, "model": "focal-tiny", "compiled": False, "image_size": 448, "mode": "train-64", "error": "OOM"},
        result("swin-tiny", 224, "infer-1", 400.0, compiled=True),
        result("focal-tiny", 224, "infer-1", 300.0, compiled=True),
    ]
    benchmark.print_table(args, results, "HEADER")
    lines = [[cell.strip() for cell in line.split("|")] for line in capsys.readouterr().out.splitlines()[1:]]
    assert lines == [
        ["HEADER"],
        ["224 px", "infer-1", "train-64", "train-64 peak MiB"],
        ["swin-tiny", "200.00 (1.00x)", "1000.00 (1.00x)", "4000 (1.00x)"],
        ["focal-tiny", "125.00 (0.62x)", "900.00 (0.90x)", "5000 (1.25x)"],
        ["swin-tiny compiled", "400.00 (1.00x)", "-", "-"],
        ["focal-tiny compiled", "300.00 (0.75x)", "-", "-"],
        ["448 px", "infer-1", "train-64", "train-64 peak MiB"],
        ["swin-tiny", "50.00 (1.00x)", "250.00 (1.00x)", "16000 (1.00x)"],
        ["focal-tiny", "40.00 (0.80x)", "OOM", "OOM"],
    ]


def test_mechanisms_are_turned_off_per_instance_without_changing_outputs(benchmark):
    import torch

    from focal_hf import modeling_focal

    torch.manual_seed(0)
    with_them = benchmark.build_model("focal-tiny", 64, num_labels=10).eval()
    without = benchmark.turn_off(copy.deepcopy(with_them), tuple(benchmark.MECHANISMS))
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(without(pixel_values).logits, with_them(pixel_values).logits, rtol=0, atol=1e-5)
    assert with_them.config._attn_implementation == "focal_sdpa" and without.config._attn_implementation == "sdpa"
    for model, turned_off in ((with_them, False), (without, True)):
        layers = [m for m in model.modules() if isinstance(m, modeling_focal.FocalLayer)]
        attentions = [m for m in model.modules() if isinstance(m, modeling_focal.FocalAttentionBase)]
        assert all(("forward" in vars(layer)) == turned_off for layer in layers)
        assert all((attention._cached_bias is None) == turned_off for attention in attentions)


def test_regathered_keys_turned_off_keep_the_gathered_keys_off_the_cpu(benchmark, gpu_memory):
    import torch

    torch.manual_seed(0)
    with_them = benchmark.build_model("focal-tiny", 64, num_labels=10).eval()
    without = benchmark.turn_off(copy.deepcopy(with_them), ("regathered-keys",))
    assert without.config._attn_implementation == "focal_sdpa_keeping_keys"
    assert with_them.config._attn_implementation == "focal_sdpa"
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # on CPU both run the CPU op
        torch.testing.assert_close(without(pixel_values).logits, with_them(pixel_values).logits, rtol=0, atol=0)
    # off the CPU (the meta device, SDPA as on a GPU) the copy keeps every block's gathered keys and values (bf16)
    # where the model keeps their source, the `qkv` projection's output (of which keys and values are views): that
    # much more memory at the peak
    batch_size, difference = 2, 0
    model = benchmark.build_model("focal-tiny", 224)
    for stage, layer in enumerate(model.focal.encoder.layers):
        for block in layer.blocks:
            attention = block.attention
            side = 56 >> stage
            key_index = attention.key_layout(side, side, torch.device("cpu")).key_index
            dim = attention.num_heads * attention.head_dim
            gathered = 2 * batch_size * key_index.numel() * dim * 2
            source = batch_size * (int(key_index.max()) + 1) * 3 * dim * 2
            difference += gathered - source
    # (SDPA on the folded windows, without the Triton kernels, which gather nothing: here Triton's interpreter would
    # run them on meta tensors)
    regathered = gpu_memory.estimate("focal-tiny", batch_size, 224, ("triton-kernels",))
    kept = gpu_memory.estimate("focal-tiny", batch_size, 224, ("regathered-keys",))
    assert kept - regathered > 0.9 * difference > 0, (kept, regathered, difference)


def test_ablation_on_cuda_without_a_gpu_is_refused_in_one_line():
    args = ["--device", "cuda", "--without", "regathered-keys"]
    result = run_script(*args, script="ablation.py", CUDA_VISIBLE_DEVICES="")
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and "--device cuda, but torch" in result.stderr


def test_ablation_run_end_to_end():
    args = ["--without", "inference-bias-cache", "--modes", "infer-1", "train-2", "--image-size", "64", "--steps", "2"]
    result = run_script(*args, "--warmup", "1", script="ablation.py")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("focal-tiny, 64 px, cpu (2 threads)") and "without inference-bias-cache" in lines[0]
    rows = [[cell.strip() for cell in line.split("|")] for line in lines[2:]]
    assert [row[0] for row in rows] == ["infer-1", "train-2"]
    assert all(float(row[1]) > 0 and float(row[2]) > 0 and row[3].endswith(")") for row in rows)


def test_ablation_against_another_version(tmp_path):
    # another version of the package (here a copy of this one) imported beside this one, each model with its own
    # version's attention
    import shutil

    other = tmp_path / "other" / "focal_hf"
    shutil.copytree(SRC / "focal_hf", other, ignore=shutil.ignore_patterns("__pycache__"))
    args = ["--against", str(other), "--modes", "infer-1", "train-2", "--image-size", "64", "--steps", "2"]
    temporary = tmp_path / "temporary"
    temporary.mkdir()
    result = run_script(*args, "--warmup", "1", script="ablation.py", TMPDIR=str(temporary))
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(temporary.iterdir()) == []  # (the link through which the other version is imported: removed at exit)
    lines = result.stdout.splitlines()
    assert f"this version and the one in {other}" in lines[0]
    assert lines[1].startswith("mode     | this (img/s) | other (img/s) | speed-up of this version")
    rows = [[cell.strip() for cell in line.split("|")] for line in lines[2:]]
    assert [row[0] for row in rows] == ["infer-1", "train-2"]
    assert all(float(row[1]) > 0 and float(row[2]) > 0 and row[3].endswith(")") for row in rows)
    # a folder without the package is refused in one line
    result = run_script("--against", str(tmp_path), script="ablation.py")
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and "expected a focal_hf package folder" in result.stderr


def test_ablation_of_exported_programs():
    # both models exported (symbolic batch size and sides), their programs' inference timed; training refused
    args = ["--without", "inference-bias-cache", "--exported", "--modes", "infer-1", "--image-size", "64"]
    result = run_script(*args, "--steps", "2", "--warmup", "1", script="ablation.py")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "without inference-bias-cache; as exported programs" in lines[0]
    rows = [[cell.strip() for cell in line.split("|")] for line in lines[2:]]
    assert [row[0] for row in rows] == ["infer-1"] and float(rows[0][1]) > 0 and float(rows[0][2]) > 0
    result = run_script("--without", "inference-bias-cache", "--exported", "--modes", "train-2", script="ablation.py")
    assert result.returncode != 0 and result.stdout == ""
    assert "--exported: expected inference modes (infer-N) only, got train-2" in result.stderr.strip().splitlines()[-1]


def test_ablation_with_another_attention():
    # transformers' SDPA (the keys gathered, the windows folded) against focal_sdpa (the CPU op)
    args = ["--attention", "sdpa", "--modes", "infer-1", "--image-size", "64", "--steps", "2"]
    result = run_script(*args, "--warmup", "1", script="ablation.py")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "attention sdpa and focal_sdpa" in lines[0]
    assert lines[1].startswith("mode     | sdpa (img/s) | focal_sdpa (img/s) | speed-up of sdpa")
    rows = [[cell.strip() for cell in line.split("|")] for line in lines[2:]]
    assert [row[0] for row in rows] == ["infer-1"]
    assert all(float(row[1]) > 0 and float(row[2]) > 0 and row[3].endswith(")") for row in rows)
    result = run_script("--attention", "no_such_attention", script="ablation.py")
    assert result.returncode != 0 and result.stdout == ""
    assert "expected a registered attention implementation" in result.stderr.strip().splitlines()[-1]


@pytest.fixture
def gpu_memory():
    return import_script("gpu_memory")


def test_autocast_emulation_casts_as_cuda_autocast(gpu_memory):
    import torch
    import torch.nn.functional as F

    from focal_hf import modeling_focal

    def meta(*shape):
        return torch.randn(*shape, device="meta")

    inputs = meta(2, 8)
    with gpu_memory.Autocast():
        projected = F.linear(inputs, meta(8, 8))
        assert projected.dtype == torch.bfloat16  # matrix products and convolutions: bf16
        assert (projected @ projected.T).dtype == torch.matmul(inputs, inputs.T).dtype == torch.bfloat16
        assert F.conv2d(meta(1, 3, 8, 8), meta(4, 3, 3, 3)).dtype == torch.bfloat16
        assert F.layer_norm(projected, (8,)).dtype == torch.float32  # normalisation, softmax, losses: float32
        assert F.softmax(projected, -1, dtype=torch.bfloat16).dtype == torch.float32
        assert F.cross_entropy(projected, torch.zeros(2, dtype=torch.long, device="meta")).dtype == torch.float32
        assert (projected + inputs).dtype == torch.float32  # the rest: type promotion
        assert torch.relu(projected).dtype == torch.bfloat16
        # the one cast of the projections' input that Focal models make where torch reports autocast on
        assert modeling_focal.autocast_input(inputs).dtype == torch.bfloat16
    assert modeling_focal.autocast_input(inputs).dtype == torch.float32  # (meta: torch reports no autocast)


def test_traffic_counts_what_operators_read_and_write(gpu_memory):
    import torch

    first, second = (torch.randn(4, 4, device="meta") for _ in range(2))  # 64 bytes each
    with gpu_memory.Traffic() as traffic:
        total = first + second  # reads 128 bytes, writes 64
        total.view(16)  # a view: nothing
        first.new_zeros(8, 4)  # a factory: writes 128, reads nothing
        total.t().contiguous()  # a copy: reads 64, writes 64
    assert traffic.bytes == 192 + 128 + 128


def test_launches_count_what_a_gpu_host_launches(gpu_memory):
    import torch

    first, second = (torch.randn(4, 4, device="meta") for _ in range(2))
    with gpu_memory.Traffic() as traffic, gpu_memory.Launches() as launches:
        total = first + second  # one kernel
        total.view(16).t().detach()  # views and an alias: none
        first.new_zeros(8, 4)  # a factory that fills its tensor: one
        total.t().contiguous()  # a copy: one
        gpu_memory.MetaLaunch()[(1,)](first, second)  # a Triton kernel: one, counted by the innermost count only
    assert launches.launches == 4
    assert traffic.bytes == 192 + 128 + 128  # (the outer count saw the operators, not the kernel)


def test_gpu_memory_counts_what_a_step_launches(gpu_memory, monkeypatch, capsys):
    # what a GPU's host launches in a Focal-T training step does not grow with the batch and holds the Triton kernels'
    # launches (a forward and a backward kernel per block) in place of the folded call's operators, which are more (by
    # at least 5 per block)
    pytest.importorskip("triton", reason="Triton has wheels for Linux on x86-64 only (setup.cfg's test extra)")

    def launches(batch_size, without=()):
        return gpu_memory.estimate("focal-tiny", batch_size, 224, without, gpu_memory.training_step_launches)

    kernels, counted = [], gpu_memory.MetaLaunch.launch

    def launch(*args, **meta):
        kernels.append(args)
        counted(*args, **meta)

    monkeypatch.setattr(gpu_memory.MetaLaunch, "launch", staticmethod(launch))
    focal = launches(1)
    assert launches(2) == focal > 1000
    assert len(kernels) == 2 * 2 * 2 * 12  # two estimates of two steps (the first creates the optimizer state)
    assert focal + 5 * 12 < launches(1, ("triton-kernels",))  # (80 fewer)
    args = ["--launches", "--models", "focal-tiny", "--batch-size", "1", "--image-sizes", "224"]
    monkeypatch.setattr("sys.argv", ["gpu_memory.py", *args])
    gpu_memory.main()
    lines = capsys.readouterr().out.splitlines()
    unit = "operators and Triton kernels but views"
    assert lines[0] == f"estimated launches of a bf16 training step on a CUDA GPU, batch 1 ({unit})"
    swin = int(lines[3].split(" | ")[1].split()[0].replace(",", ""))
    assert lines[3] == f"| swin-tiny | {swin:,} (1.00x) |"
    assert lines[4] == f"| focal-tiny | {focal:,} ({focal / swin:.2f}x) |"


def test_gpu_memory_estimate_runs_the_gpu_kernel_in_bf16(gpu_memory):
    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "efficient_attention" in func.name():
                self.calls.append((func.name(), args[1 if "backward" in func.name() else 0].dtype))
            return func(*args, **(kwargs or {}))

    sdpa = F.scaled_dot_product_attention
    with Record() as record:  # (the folded SDPA call: here Triton's interpreter would run the kernels on meta tensors)
        peak = gpu_memory.estimate("focal-tiny", 2, 64, without=("triton-kernels",))
    assert F.scaled_dot_product_attention is sdpa  # put back
    blocks = 12  # Focal-T: 2 + 2 + 6 + 2, two steps (the first creates the optimizer state)
    assert record.calls.count(("aten::_scaled_dot_product_efficient_attention", torch.bfloat16)) == 2 * blocks
    assert record.calls.count(("aten::_scaled_dot_product_efficient_attention_backward", torch.bfloat16)) == 2 * blocks
    assert len(record.calls) == 4 * blocks
    assert 0 < peak < 2**30


def test_gpu_memory_estimates_activation_checkpointing(gpu_memory):
    # with activation checkpointing each block keeps only its input, on the folded path as for Swin-T: a bf16 step at
    # batch 16 peaks at about half (the folded path's saved-tensor hooks replacing the checkpoint's kept 0.86x); the
    # checkpoint's recomputation runs under the autocast stand-in, as CUDA's autocast is restored for it
    peaks = {}
    for name in ("swin-tiny", "focal-tiny"):
        for checkpointing in (False, True):
            peaks[name, checkpointing] = gpu_memory.estimate(
                name, 16, 224, ("triton-kernels",), checkpointing=checkpointing
            )
    for name in ("swin-tiny", "focal-tiny"):
        assert 0 < peaks[name, True] < 0.6 * peaks[name, False], peaks
    assert peaks["focal-tiny", True] < 1.15 * peaks["swin-tiny", True], peaks


def test_gpu_memory_run_end_to_end():
    args = ["--models", "focal-tiny", "--batch-size", "1", "--image-sizes", "224", "256"]
    result = run_script(*args, script="gpu_memory.py")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("estimated peak memory of a bf16 training step on a CUDA GPU, batch 1")
    assert lines[1] == "| model | 224 px | 256 px |"
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines[3:]]
    assert [row[0] for row in rows] == ["swin-tiny", "focal-tiny"]
    assert rows[0][1:] == [rows[0][1].split()[0] + " (1.00x)", rows[0][2].split()[0] + " (1.00x)"]
    focal = [float(cell.split()[0].replace(",", "")) for cell in rows[1][1:]]
    assert focal[1] > focal[0] > 0  # more pixels, more memory
    result = run_script("--traffic", "--checkpointing", *args[:-1], script="gpu_memory.py")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("estimated memory traffic of a bf16 training step on a CUDA GPU, batch 1 (GB")
    assert "; activation checkpointing" in lines[0]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines[3:]]
    assert [row[0] for row in rows] == ["swin-tiny", "focal-tiny"] and rows[0][1].endswith("(1.00x)")
    assert 0 < float(rows[0][1].split()[0]) < float(rows[1][1].split()[0])  # Focal-T moves more than Swin-T


def test_gpu_memory_estimates_the_triton_kernels():
    # Focal-T on the meta device with focal_sdpa's GPU path, the Triton kernels (their launches counted, nothing run),
    # and without them (SDPA on the folded windows): without the gathered keys, their gradients and the per-image bias
    # gradient the step moves far fewer bytes (0.80x at batch 16, 0.77x at 64; at batch 4 0.88x: the bias weighs more
    # there; 0.85x at batch 16 while the kernels copied their inputs into row-major layouts first), and holds no more
    # memory
    pytest.importorskip("triton", reason="Triton has wheels for Linux on x86-64 only (setup.cfg's test extra)")
    figures = {}
    for what in ("--traffic", None):
        for without in ((), ("triton-kernels",)):
            args = ["--models", "focal-tiny", "--batch-size", "16", "--image-sizes", "224"]
            args += [what] if what else []
            args += ["--without", *without] if without else []
            result = run_script(*args, script="gpu_memory.py")
            assert result.returncode == 0, result.stderr[-3000:]
            lines = result.stdout.splitlines()
            assert lines[0].endswith("; Focal models without triton-kernels") == bool(without), lines[0]
            assert lines[-1].startswith("| focal-tiny | ")
            figures[what, without] = float(lines[-1].split("|")[2].split()[0].replace(",", ""))
    kernels, folded = (), ("triton-kernels",)
    assert 0 < figures["--traffic", kernels] < 0.83 * figures["--traffic", folded], figures
    assert 0 < figures[None, kernels] <= figures[None, folded], figures


def test_gather_kernels_time_every_variant_and_catch_a_wrong_one(capsys, monkeypatch):
    gather_kernels = import_script("gather_kernels")
    args = ["--device", "cpu", "--batch-size", "2", "--image-size", "64", "--dtype", "bf16", "--steps", "2"]
    assert gather_kernels.main(args) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    # Focal-T at 64 px: four distinct block shapes (the last two with shrunk windows), three variants each (the
    # box too: every Focal-T block's fine keys form one), index_select the baseline
    assert [row[1] for row in rows] == ["index_select", "embedding", "box"] * 4
    assert rows[0][0] == "stage 1: 9 windows x 224 keys" and rows[0][4] == "1.00x / 1.00x"
    assert all(float(row[2]) > 0 and float(row[3]) > 0 for row in rows)
    # Focal-fast-T has no box variant
    assert gather_kernels.main([*args, "--model", "focal-fast-tiny"]) == 0
    assert {line.split(" | ")[1] for line in capsys.readouterr().out.splitlines()[2:]} == {"index_select", "embedding"}
    # a variant that takes the wrong rows is reported and fails the run
    variants = gather_kernels.variants

    def with_a_wrong_one(block, batch_size, device):
        found = variants(block, batch_size, device)
        index_select = found["index_select"]
        shifted = gather_kernels.Variant(
            index_select.key_index, index_select.prepare, lambda source: index_select.gather(source.roll(1, dims=1))
        )
        return {**found, "shifted": shifted}

    monkeypatch.setattr(gather_kernels, "variants", with_a_wrong_one)
    assert gather_kernels.main(args) == 1
    assert capsys.readouterr().err.count("| shifted | MISMATCH") == 4


def test_gather_kernels_on_cuda_without_a_gpu_is_refused_in_one_line():
    result = run_script(script="gather_kernels.py", CUDA_VISIBLE_DEVICES="")
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and "--device cuda, but torch" in result.stderr


def test_profile_run_end_to_end():
    # the profile of a training step and of inference, on the CPU (`--device cpu`): the phases' host times, the host's
    # time by function (Python functions of the model and torch's operators, the backward pass's included) and the
    # profiler's table
    args = ["--device", "cpu", "--models", "focal-tiny", "--modes", "train-1", "infer-1", "--image-size", "96"]
    result = run_script(*args, "--rows", "60", script="profile_gpu.py")
    assert result.returncode == 0, result.stderr[-3000:]
    training, inference = result.stdout.split("\n=== ")[1:]
    for section, mode, phases in (
        (training, "train-1", ["forward", "backward", "optimizer"]),
        (inference, "infer-1", ["forward"]),
    ):
        lines = section.splitlines()
        assert lines[0] == f"focal-tiny, {mode}, 96 px, bf16, cpu"
        step, times = lines[1].split("; on the host (ms, median of 5): ")
        assert float(step.removeprefix("step ").removesuffix(" ms")) > 0
        times = dict(phase.rsplit(" ", 1) for phase in times.split(", "))
        assert list(times) == [*phases, "together"] and all(float(value) > 0 for value in times.values())
        assert lines[2].startswith("host time by function (cProfile, ")
        functions = lines[3:63]
        assert all(len(line.split(maxsplit=2)) == 3 and float(line.split()[0]) >= 0 for line in functions)
        assert "forward (modeling_focal.py:" in " ".join(functions)
        assert lines[63] == "the model's functions by cumulative host time (ms, calls, function):"
        model_functions = list(itertools.takewhile(re.compile(r"^ *[0-9.]+ +[0-9]+  \S").match, lines[64:124]))
        cumulative = [float(line.split()[0]) for line in model_functions]
        assert cumulative == sorted(cumulative, reverse=True) and "(modeling_focal.py:" in model_functions[0]
        assert "focal_transformer::cpu_gathered_attention_2" in section  # (the profiler's table)
        assert lines[-1] == "host synchronisations: not measured on the CPU"  # (CUDA's synchronisation debug mode)
    functions = " ".join(training.splitlines()[3:63])
    assert "run_backward" in functions and "_cpu_gathered_attention_backward (modeling_focal.py:" in functions
    assert "cpu_gathered_attention_2_backward" in training and "backward" not in inference
    result = run_script("--models", "focal-tiny", script="profile_gpu.py", CUDA_VISIBLE_DEVICES="")
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and "--device cuda, but torch" in result.stderr


def test_launch_cost_needs_a_gpu():
    # benchmarks/launch_cost.py (the host's time per call of the Triton op's layers) runs on a GPU only: without one
    # it says so in one line, before building anything
    result = run_script("--calls", "1", script="launch_cost.py", CUDA_VISIBLE_DEVICES="")
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0
    assert "launch_cost.py: it measures on a CUDA GPU, but torch" in result.stderr
