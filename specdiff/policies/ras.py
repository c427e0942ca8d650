"""RAS (Liu et al., 2025, "Region-Adaptive Sampling"): token skipping over the
whole network, scored from the previous output alone.

score = std (or l2 norm) over channels of each token's previous output,
times exp(starvation_scale * times skipped). The top (1 - cache_ratio)
tokens run; every other token copies its previous output (no multi-level
fill). Defaults follow the paper: 4 dense warm-up steps, dense resets at
steps 12 and 22 (of 30), starvation 0.1, half the tokens cached.
CFG rows of one prompt share one selection, as RAS does.
"""

from __future__ import annotations

import dataclasses

import torch

from specdiff.engine.policy import (
    ConfigError,
    DenseScheduleConfig,
    Policy,
    StepPlan,
    StepSignals,
    check_range,
    share_across_cfg,
    top_tokens,
)


@dataclasses.dataclass(frozen=True)
class RASConfig(DenseScheduleConfig):
    """RAS (region-adaptive sampling): skip the tokens whose last output moved least.

    Args:
        cache_ratio (float, default 0.5): share of image tokens NOT computed on a sparse step, in [0, 1).
        metric (str, default "std"): score per token from its previous output, "std" or "l2".
        starvation_scale (float, default 0.1): lambda in exp(lambda * steps skipped), so skipped tokens come back.
        warmup_steps (int, default 4): steps at the start that compute every token.
        reset_steps (tuple of int, default (12, 22)): further steps (0-based) that compute every token.
    """

    method = "ras"

    cache_ratio: float = 0.5
    metric: str = "std"
    starvation_scale: float = 0.1
    warmup_steps: int = 4
    reset_steps: tuple[int, ...] = (12, 22)

    def validate(self) -> None:
        super().validate()
        check_range(self, "cache_ratio", 0.0, 1.0, high_open=True)
        check_range(self, "starvation_scale", 0.0, 10.0)
        if self.metric not in ("std", "l2"):
            raise ConfigError(f"RASConfig.metric must be 'std' or 'l2', got {self.metric!r}")


class RASPolicy(Policy):
    config: RASConfig
    reads_kv_cache = True

    def dense_step(self, signals: StepSignals) -> bool:
        return self.config.is_dense(signals.step) or not signals.last_outputs

    def select(self, signals: StepSignals) -> StepPlan:
        last = signals.last_outputs[0].float()
        score = last.std(dim=-1) if self.config.metric == "std" else last.norm(dim=-1)
        if signals.cached_count is not None:
            score = score * torch.exp(self.config.starvation_scale * signals.cached_count.float())
        score = share_across_cfg(score, signals.cfg_groups)
        return StepPlan(compute=top_tokens(score, self.config.cache_ratio), reuse=None)
