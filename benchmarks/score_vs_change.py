"""Does a token's score predict how much its output moves? (SpecDiff's premise, measured.)

SpecDiff computes the top-scoring tokens and reuses the others' last output,
so it works when the score ranks tokens by how far their output moves in the
step about to run. This script runs full-compute generations of a model (the
embedded one by default, or a local SD3 / FLUX folder) while recording, at
every step, each signal a method could rank tokens by, and the change each
token's output then makes (L2 over channels of F_t - F_{t-1}). It prints,
per signal:
- Spearman rank correlation with the change (mean over rows and steps; and
  per stage, thirds of the run: early / middle / late), and with the relative change |F_t - F_{t-1}| / |F_{t-1}| (the paper's wording);
- the share of the step's total change held by the 10 % of tokens the signal
  ranks highest (what a cache ratio of 0.9 computes; oracle = the best possible).

    python benchmarks/score_vs_change.py --num-prompts 16
    python benchmarks/score_vs_change.py --model /path/to/sd3 --prompts captions.txt --num-prompts 64 --batch-size 4
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm

import specdiff
from specdiff.lab.evaluation.benchmark import bench_prompts, load_bench_pipeline
from specdiff.engine.policy import normalise
from specdiff.lab.studies import SpecDiffStudyConfig


def record_signals(pipe, prompts: list[str], steps: int, seeds: list[int], config: SpecDiffStudyConfig, extra: dict) -> list[dict]:
    """Every token computed (cache ratio 0) with attention taps; per step the signals and the outputs so far."""
    seen = []

    def record(event: specdiff.StepEvent):
        signals = event.signals
        if signals.attention is not None and len(signals.last_outputs) >= 2:
            future = signals.future(signals.timestep)
            spec_change = signals.future_change(signals.timestep)
            seen.append({
                "branch": event.branch,  # FLUX true CFG: two calls per step, one state each
                "step": signals.step,
                "his": signals.attention.float().cpu(),
                "fut": None if future is None else future.float().cpu(),
                "spec_change": None if spec_change is None else spec_change.float().cpu(),
                "last": signals.last_outputs[0].float().cpu(),
                "before": signals.last_outputs[1].float().cpu(),
            })

    specdiff.enable(pipe, config)
    specdiff.observe(pipe, record)
    try:
        generator = [torch.Generator().manual_seed(seed) for seed in seeds]
        pipe(prompt=prompts, num_inference_steps=steps, generator=generator, output_type="latent", **extra)
    finally:
        specdiff.disable(pipe)
    return seen


def top_share(score: torch.Tensor, change: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """(B,) share of each row's total change held by its top `fraction` tokens by score."""
    k = max(1, round(fraction * score.shape[-1]))
    picked = change.gather(-1, score.topk(k, dim=-1).indices)
    return picked.sum(-1) / change.sum(-1)


STAGES = ("early", "middle", "late")  # thirds of the run


def accumulate(seen: list[dict], first_step: int, generator: torch.Generator, results: dict, steps: int = 28) -> None:
    """Add one batch's per-(row, step) statistics for every signal to `results`."""
    # step s sees outputs up to s-1; its change F_s - F_{s-1} is read at step s+1 of the same branch
    by_key = {(entry["branch"], entry["step"]): entry for entry in seen}
    for (branch, step), now in by_key.items():
        nxt = by_key.get((branch, step + 1))
        if nxt is None or step < first_step:
            continue
        change = (nxt["last"] - nxt["before"]).norm(dim=-1)
        relative = change / nxt["before"].norm(dim=-1).clamp_min(1e-6)  # the paper's "relative change"
        has_future = now["fut"] is not None
        signals = {
            "his: attention received, last step": normalise(now["his"]),
            "fut: speculative attention": normalise(now["fut"]) if has_future else None,
            "his x fut (SpecDiff's score without starvation)":
                normalise(now["his"]) * normalise(now["fut"]) if has_future else None,
            "std of the last output (RAS)": now["last"].std(dim=-1),
            "last change, norm of F_t-1 - F_t-2 (importance=\"change\")": (now["last"] - now["before"]).norm(dim=-1),
            "last change x fut (importance=\"change-fut\")":
                normalise((now["last"] - now["before"]).norm(dim=-1)) * normalise(now["fut"]) if has_future else None,
            "speculative change (importance=\"spec-change\")": now["spec_change"],
            "random": torch.rand(change.shape, generator=generator),
            "oracle: the change itself": change,
        }
        for name, score in signals.items():
            if score is None:
                continue
            entry = results.setdefault(name, {"rho": [], "rho_relative": [], "top": [], **{st: [] for st in STAGES}})
            stage = STAGES[min(2, 3 * step // max(steps, 1))]
            for row in range(change.shape[0]):
                rho = spearmanr(score[row].numpy(), change[row].numpy()).statistic
                entry["rho"].append(rho)
                entry[stage].append(rho)
                entry["rho_relative"].append(spearmanr(score[row].numpy(), relative[row].numpy()).statistic)
            entry["top"].extend(top_share(score, change).tolist())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="embedded (default), tiny-sd3, tiny-flux, or a local folder")
    p.add_argument("--prompts", default=None, metavar="FILE", help="prompts, one per line (default: scene prompts)")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--split", default="train", choices=["train", "heldout"], help="embedded model's prompt set")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--first-step", type=int, default=4, help="skip the dense warm-up steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--tap-queries", type=int, default=64)
    p.add_argument("--speculative-steps", type=int, default=2, help="of the speculative pass (fut, spec-change)")
    p.add_argument("--tap-include-text", action="store_true", help="text queries count in attention received")
    args = p.parse_args()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    pipe, extra = load_bench_pipeline(args.model, device)
    extra.update({side: getattr(args, side) for side in ("height", "width") if getattr(args, side) is not None})
    pipe.set_progress_bar_config(disable=True)
    prompts, _ = bench_prompts(pipe, args.split, args.num_prompts, args.prompts)
    taps = SpecDiffStudyConfig(cache_ratio=0.0, warmup_steps=1, reset_steps=(), tap_queries=args.tap_queries,
                               tap_include_text=args.tap_include_text, speculative_steps=args.speculative_steps)
    generator = torch.Generator().manual_seed(args.seed)
    results: dict[str, dict[str, list[float]]] = {}
    for start in tqdm(range(0, len(prompts), args.batch_size), desc="batches"):
        batch = prompts[start : start + args.batch_size]
        seeds = [args.seed + start + i for i in range(len(batch))]
        accumulate(record_signals(pipe, batch, args.steps, seeds, taps, extra), args.first_step, generator, results,
                   args.steps)

    source = args.prompts or f"{args.split} prompts"
    print(f"{args.model}, {len(prompts)} prompts ({source}), {args.steps} steps, steps >= {args.first_step}, "
          f"taps: {args.tap_queries} image queries{' + text queries' if args.tap_include_text else ''}, "
          f"{len(next(iter(results.values()))['top'])} (row, step) pairs\n")
    print("| signal | Spearman rho with the change | early | middle | late | rho with the relative change | "
          "share of the change in its top 10 % |")
    print("|---|---|---|---|---|---|---|")
    for name, entry in results.items():
        stages = " | ".join(f"{np.nanmean(entry[st]):.3f}" if entry[st] else "-" for st in STAGES)
        print(f"| {name} | {np.nanmean(entry['rho']):.3f} | {stages} | {np.nanmean(entry['rho_relative']):.3f} | "
              f"{100 * np.mean(entry['top']):.1f} % |")


if __name__ == "__main__":
    main()
