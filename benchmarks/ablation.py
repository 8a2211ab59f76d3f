"""What CPU speed mechanisms are worth, measured in one process: a Focal model with them and a copy without them
(same weights; `benchmark.py`'s `--without` names), their steps interleaved (A B B A ...), so that the machine's
drift and the heap's state affect both alike.

    python benchmarks/ablation.py --without inference-bias-cache            # Focal-T; infer-1, infer-8, train-8
    python benchmarks/ablation.py --model focal-fast-tiny --without cpu-chunking --modes infer-8 --steps 30

For each mode it prints both speeds (medians) and the speed-up the mechanisms give: the median over step pairs of
(time without) / (time with), with its interquartile range; a mechanism whose range lies above 1.03 is worth more
than 3 %. Speed only: peak memory needs a process per measurement (`benchmark.py --without`).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

from benchmark import MECHANISMS, MODELS, REFERENCE, build_model, mode_type, positive_int, turn_off


def paired_steps(steps: dict, count: int) -> dict[str, list[float]]:
    """Run the named step functions `count` times each, alternating their order (ABBA), and return their times."""
    names = list(steps)
    times = {name: [] for name in names}
    for index in range(count):
        for name in names if index % 2 == 0 else reversed(names):
            begin = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - begin)
    return times


def make_step(model, training: bool, pixel_values, labels):
    """One inference step (no autograd, eval mode) or training step (train mode, AdamW) of `model`."""
    import torch

    model.train(training)
    if not training:

        @torch.no_grad()
        def infer():
            model(pixel_values)

        return infer
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step():
        model(pixel_values, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def quartiles(values: list[float]) -> tuple[float, float, float]:
    first, median, third = statistics.quantiles(values, n=4, method="inclusive")
    return first, median, third


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="focal-tiny", choices=[name for name in MODELS if name != REFERENCE])
    parser.add_argument("--without", nargs="+", required=True, choices=sorted(MECHANISMS))
    parser.add_argument("--modes", nargs="+", type=mode_type, default=["infer-1", "infer-8", "train-8"])
    parser.add_argument("--image-size", type=positive_int, default=224)
    parser.add_argument("--steps", type=positive_int, default=20, help="timed steps of each model per mode")
    parser.add_argument("--warmup", type=positive_int, default=2)
    parser.add_argument("--threads", type=positive_int, default=2)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps: expected at least 2 (the spread needs pairs)")

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with_them = build_model(args.model, args.image_size)
    models = {"with": with_them, "without": turn_off(copy.deepcopy(with_them), tuple(args.without))}
    print(
        f"{args.model}, {args.image_size} px, cpu ({args.threads} threads), torch {torch.__version__}: with and "
        f"without {', '.join(args.without)}; medians of {args.steps} interleaved steps each"
    )
    print("mode     | with (img/s) | without (img/s) | speed-up from them (IQR)")
    for mode in args.modes:
        kind, batch_size = mode.split("-")
        batch_size = int(batch_size)
        pixel_values = torch.randn(batch_size, 3, args.image_size, args.image_size)
        labels = torch.randint(0, 1000, (batch_size,))
        steps = {name: make_step(model, kind == "train", pixel_values, labels) for name, model in models.items()}
        paired_steps(steps, args.warmup)
        times = paired_steps(steps, args.steps)
        speeds = {name: batch_size / statistics.median(values) for name, values in times.items()}
        first, median, third = quartiles([b / a for a, b in zip(times["with"], times["without"], strict=True)])
        print(
            f"{mode:8s} | {speeds['with']:12.2f} | {speeds['without']:15.2f} | {median:.3f}x ({first:.3f}-{third:.3f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
