"""Does a token's score predict how much its output moves? (SpecDiff's premise, measured.)

SpecDiff computes the top-scoring tokens and reuses the others' last output,
so it works when the score ranks tokens by how far their output moves in the
step about to run. This script runs full-compute generations of the embedded
model while recording, at every step, each signal a method could rank tokens
by, and the change each token's output then makes (L2 over channels of
F_t - F_{t-1}). It prints, per signal:
- Spearman rank correlation with the change (mean over rows and steps), and
  with the relative change |F_t - F_{t-1}| / |F_{t-1}| (the paper's wording);
- the share of the step's total change held by the 10 % of tokens the signal
  ranks highest (what a cache ratio of 0.9 computes; oracle = the best possible).

    python benchmarks/score_vs_change.py --num-prompts 16
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy.stats import spearmanr

import specdiff
from specdiff.policies.base import DENSE, normalise
from specdiff.policies.specdiff import SpecDiffConfig
from specdiff.reference.pipeline import load_scene_pipeline
from specdiff.reference.scenes import held_out_prompts, training_prompts


def record_signals(pipe, prompts: list[str], steps: int, seed: int, config: SpecDiffConfig) -> list[dict]:
    """Full compute with attention taps; per step the signals and the outputs seen so far."""
    specdiff.enable(pipe, config)
    runtime = pipe.transformer._specdiff_state.runtime
    seen = []

    def plan(signals):
        if signals.attention is not None and len(signals.last_outputs) >= 2:
            future = signals.future(signals.timestep)
            seen.append({
                "step": signals.step,
                "his": signals.attention.float().clone(),
                "fut": None if future is None else future.float().clone(),
                "last": signals.last_outputs[0].float().clone(),
                "before": signals.last_outputs[1].float().clone(),
            })
        return DENSE  # every token runs: the outputs are the true ones

    runtime.policy.plan = plan
    try:
        generator = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        pipe(prompt=prompts, num_inference_steps=steps, generator=generator, output_type="pt")
    finally:
        specdiff.disable(pipe)
    return seen


def top_share(score: torch.Tensor, change: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """(B,) share of each row's total change held by its top `fraction` tokens by score."""
    k = max(1, round(fraction * score.shape[-1]))
    picked = change.gather(-1, score.topk(k, dim=-1).indices)
    return picked.sum(-1) / change.sum(-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--split", default="train", choices=["train", "heldout"])
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--first-step", type=int, default=4, help="skip the dense warm-up steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tap-queries", type=int, default=64)
    p.add_argument("--tap-include-text", action="store_true", help="text queries count in attention received")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    pipe = load_scene_pipeline()
    pipe.set_progress_bar_config(disable=True)
    scenes = (training_prompts if args.split == "train" else held_out_prompts)(args.num_prompts)
    taps = SpecDiffConfig(cache_ratio=0.0, warmup_steps=1, reset_steps=(), tap_queries=args.tap_queries,
                          tap_include_text=args.tap_include_text)
    seen = record_signals(pipe, [s.caption() for s in scenes], args.steps, args.seed, taps)

    # step s sees outputs up to s-1; its change F_s - F_{s-1} is read at step s+1
    pairs = [(now, nxt) for now, nxt in zip(seen, seen[1:]) if nxt["step"] == now["step"] + 1]
    generator = torch.Generator().manual_seed(args.seed)
    results: dict[str, dict[str, list[float]]] = {}
    for now, nxt in pairs:
        if now["step"] < args.first_step:
            continue
        change = (nxt["last"] - nxt["before"]).norm(dim=-1)
        relative = change / nxt["before"].norm(dim=-1).clamp_min(1e-6)  # the paper's "relative change"
        signals = {
            "his (attention received, last step)": normalise(now["his"]),
            "fut (speculative attention)": normalise(now["fut"]) if now["fut"] is not None else None,
            "his x fut (SpecDiff)": normalise(now["his"]) * normalise(now["fut"]) if now["fut"] is not None else None,
            "std of last output (RAS)": now["last"].std(dim=-1),
            "last change, norm of F_t-1 - F_t-2": (now["last"] - now["before"]).norm(dim=-1),
            "random": torch.rand(change.shape, generator=generator),
            "oracle: the change itself": change,
        }
        for name, score in signals.items():
            if score is None:
                continue
            entry = results.setdefault(name, {"rho": [], "rho_relative": [], "top": []})
            for row in range(change.shape[0]):
                entry["rho"].append(spearmanr(score[row].numpy(), change[row].numpy()).statistic)
                entry["rho_relative"].append(spearmanr(score[row].numpy(), relative[row].numpy()).statistic)
            entry["top"].extend(top_share(score, change).tolist())

    print(f"{args.num_prompts} {args.split} prompts, {args.steps} steps, steps >= {args.first_step}, "
          f"taps: {args.tap_queries} image queries{' + text queries' if args.tap_include_text else ''}, "
          f"{len(next(iter(results.values()))['top'])} (row, step) pairs\n")
    print("| signal | Spearman rho with the change | rho with the relative change | change held by its top 10 % |")
    print("|---|---|---|---|")
    for name, entry in results.items():
        print(f"| {name} | {np.nanmean(entry['rho']):.3f} | {np.nanmean(entry['rho_relative']):.3f} | "
              f"{100 * np.mean(entry['top']):.1f} % |")


if __name__ == "__main__":
    main()
