"""Ablation: SpecDiff's schedule and multi-level fill, but tokens chosen at random.

Tells how much of SpecDiff's quality comes from its scores rather than from
the number of tokens it computes. Random draws come from a generator seeded
per generation, so results reproduce.
"""

from __future__ import annotations

import dataclasses

import torch

from specdiff.engine.policy import DenseScheduleConfig, Policy, StepPlan, StepSignals, check_range, top_tokens
from specdiff.policies.specdiff import lowest_mass


@dataclasses.dataclass(frozen=True)
class RandomTokensConfig(DenseScheduleConfig):
    """Random tokens (the ablation): SpecDiff's fill, tokens drawn at random (seeded by enable's seed).

    Args:
        cache_ratio (float, default 0.9): share of image tokens NOT computed on a sparse step, in [0, 1).
        reuse_mass (float, default 0.1): as in SpecDiffConfig, applied to the random scores.
        warmup_steps (int, default 4): steps at the start that compute every token.
        reset_steps (tuple of int, default (12, 22)): further steps (0-based) that compute every token;
            SpecDiff's, so that the ablation differs from it only in how tokens are chosen.
    """

    method = "random"

    reset_steps: tuple[int, ...] = (12, 22)
    cache_ratio: float = 0.9
    reuse_mass: float = 0.1

    def validate(self) -> None:
        super().validate()
        check_range(self, "cache_ratio", 0.0, 1.0, high_open=True)
        check_range(self, "reuse_mass", 0.0, 1.0)


class RandomTokensPolicy(Policy):
    config: RandomTokensConfig
    reads_kv_cache = True

    def dense_step(self, signals: StepSignals) -> bool:
        return self.config.is_dense(signals.step) or not signals.last_outputs

    def step_inputs(self, signals: StepSignals) -> dict[str, torch.Tensor]:
        # drawn on the host from the per-generation generator, so a replayed step gets new draws
        return {"score": torch.rand(signals.batch, signals.num_tokens, generator=signals.generator)}

    def select(self, signals: StepSignals) -> StepPlan:
        score = signals.inputs["score"]
        return StepPlan(compute=top_tokens(score, self.config.cache_ratio), reuse=lowest_mass(score, self.config.reuse_mass))
