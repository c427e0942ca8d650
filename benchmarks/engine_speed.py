"""Engine benchmark: full compute vs SpecDiff on a random-weight SD3 transformer, CPU.

    python benchmarks/engine_speed.py --width 512 --layers 4 --size 128 --steps 28 --repeats 3

Prints a Markdown table: wall-clock per generation (median of interleaved
repeats), the wall-clock speed-up (median of per-repeat ratios to full
compute, measured in the same repeat), the FLOPs ratio of the transformer,
and the share of the speculative pass and of scoring. Random weights: this
measures the engine's speed, not image quality.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm.auto import tqdm

import specdiff
from specdiff.evaluation.flops import count_module_flops
from specdiff.tiny_pipelines import tiny_sd3_pipeline


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--size", type=int, default=128, help="pixels; VAE /2 and patch 2: (size/4)^2 image tokens")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95])
    p.add_argument("--warmup-steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    pipe = tiny_sd3_pipeline(width=args.width, layers=args.layers, heads=args.heads)
    pipe.set_progress_bar_config(disable=True)
    call = dict(
        prompt="a photo of a red fox in the snow", num_inference_steps=args.steps, height=args.size,
        width=args.size, guidance_scale=args.guidance, output_type="latent",
    )
    methods = {"full compute": None}
    for r in args.ratios:
        methods[f"SpecDiff {r:.2f}"] = specdiff.SpecDiffConfig(cache_ratio=r, warmup_steps=args.warmup_steps)

    def run(config):
        if config is not None:
            specdiff.enable(pipe, config)
        try:
            tic = time.perf_counter()
            pipe(**call, generator=torch.Generator().manual_seed(0))
            seconds = time.perf_counter() - tic
            summary = specdiff.summary(pipe) if config is not None else None
        finally:
            if config is not None:
                specdiff.disable(pipe)
        return seconds, summary

    flops = {}
    for name, config in methods.items():
        if config is not None:
            specdiff.enable(pipe, config)
        try:
            flops[name] = count_module_flops(lambda: pipe(**call, generator=torch.Generator().manual_seed(0)), pipe.transformer)
        finally:
            if config is not None:
                specdiff.disable(pipe)
    run(None)  # warm-up
    times = {name: [] for name in methods}
    shares = {name: [] for name in methods}
    for _ in tqdm(range(args.repeats), desc="interleaved repeats"):
        for name, config in methods.items():
            seconds, summary = run(config)
            times[name].append(seconds)
            if summary is not None:
                shares[name].append((summary.speculation_seconds / seconds, summary.scoring_seconds / seconds))

    tokens = (args.size // 4) ** 2
    print(
        f"\nSD3 transformer, random weights: width {args.width}, {args.layers} layers, {tokens} image tokens, "
        f"{args.steps} steps, CFG {args.guidance}, {torch.get_num_threads()} CPU threads, {args.repeats} repeats\n"
    )
    print("| method | s / generation (median) | wall-clock speed-up | FLOPs ratio (full / method) | speed-up / FLOPs ratio | speculation | scoring |")
    print("|---|---|---|---|---|---|---|")
    base = times["full compute"]
    for name in methods:
        speedup = statistics.median(b / t for b, t in zip(base, times[name]))
        flop_ratio = flops["full compute"] / flops[name]
        spec = f"{100 * statistics.median(s[0] for s in shares[name]):.1f}%" if shares[name] else "-"
        score = f"{100 * statistics.median(s[1] for s in shares[name]):.1f}%" if shares[name] else "-"
        print(
            f"| {name} | {statistics.median(times[name]):.2f} | {speedup:.2f}x | {flop_ratio:.2f}x | "
            f"{100 * speedup / flop_ratio:.0f}% | {spec} | {score} |"
        )


if __name__ == "__main__":
    main()
