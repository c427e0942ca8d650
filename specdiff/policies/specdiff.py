"""SpecDiff (Pan et al., AAAI 2026): self-speculative, multi-level token caching.

Per sparse step every image token gets
    score = his * fut * exp(starvation_scale * cached_count)
his: attention it received in the previous real step; fut: attention it
received in the speculative run at the nearest future speculative timestep
(the closest at or below the current one; the last one when none is left).
Both are normalised to mean 1 per row. The top (1 - cache_ratio) tokens run
(C1); of the rest, the lowest-score tokens holding `reuse_mass` of the total
score copy their last output (C2); the others (C3) take the weighted average
of their last three outputs (engine/history.py).

Choices where the paper is silent (see DESIGN.md): cached_count resets when
a token is computed (as in RAS); the C2 mass is over all tokens and uses
his * fut without the starvation factor; CFG rows of one prompt share one
selection, and both his and fut come from the conditional rows; attention is
averaged over heads and summed over layers, from `tap_queries` sampled image
queries per layer.
"""

from __future__ import annotations

import dataclasses

import torch

from specdiff.engine.policy import (
    DenseScheduleConfig,
    Policy,
    StepPlan,
    StepSignals,
    check_int,
    check_range,
    normalise,
    share_across_cfg,
    top_tokens,
)


@dataclasses.dataclass(frozen=True)
class SpecDiffConfig(DenseScheduleConfig):
    """SpecDiff: score tokens by the attention they received (his) x the attention a short speculative
    run says they will receive (fut) x a starvation term; compute the top, reuse or extrapolate the rest.

    Args:
        cache_ratio (float, default 0.9): share of image tokens NOT computed on a sparse step, in [0, 1).
        speculative_steps (int, default 2): steps of the speculative run (0 = no future term).
        starvation_scale (float, default 1.0): lambda in exp(lambda * steps cached); 1.0 is the paper's form.
        reuse_mass (float, default 0.1): score mass of the lowest tokens that copy their last output (C2);
            the other non-computed tokens extrapolate from their last three outputs (C3).
        tap_queries (int, default 64): sampled queries per attention layer that measure attention received.
        speculative_cfg (bool, default False): run the speculative pass with the pipeline's classifier-free
            guidance (True, the paper's "same input" read literally) or on the conditional rows only
            (False: about half its cost; both CFG halves share the maps).
        warmup_steps (int, default 4): steps at the start that compute every token.
        reset_steps (tuple of int, default (12, 22)): further steps (0-based) that compute every token.

    In a CFG batch ([uncond, cond]) both halves share one selection and the taps read the conditional
    rows, as the speculative map does (BENCHMARKS.md: no loss, half the taps' cost). The studies' other
    scores and switches are the lab's `specdiff-study` method (specdiff/lab/studies.py).
    """

    method = "specdiff"

    reset_steps: tuple[int, ...] = (12, 22)  # chosen by the sweeps in BENCHMARKS.md
    cache_ratio: float = 0.9
    speculative_steps: int = 2
    starvation_scale: float = 1.0
    reuse_mass: float = 0.1
    tap_queries: int = 64
    speculative_cfg: bool = False  # half the speculation's cost for -0.3 dB (BENCHMARKS.md)

    def validate(self) -> None:
        super().validate()
        check_range(self, "cache_ratio", 0.0, 1.0, high_open=True)
        check_int(self, "speculative_steps", 0, 10)
        check_range(self, "starvation_scale", 0.0, 10.0)
        check_range(self, "reuse_mass", 0.0, 1.0)
        check_int(self, "tap_queries", 1, 4096)


class SpecDiffPolicy(Policy):
    config: SpecDiffConfig
    reads_kv_cache = True

    @property
    def speculative_steps(self) -> int:
        return self.config.speculative_steps

    @property
    def speculative_cfg(self) -> bool:
        return self.config.speculative_cfg

    @property
    def tap_queries(self) -> int:
        return self.config.tap_queries

    @property
    def tap_cfg(self) -> bool:
        return False  # a CFG batch's conditional rows only

    def needs_attention_after(self, step: int, num_steps: int) -> bool:
        # only a sparse step reads the previous step's taps ("his"): none before dense steps or at the end
        return step + 1 < num_steps and not self.config.is_dense(step + 1)

    def dense_step(self, signals: StepSignals) -> bool:
        return self.config.is_dense(signals.step) or signals.attention is None

    def importance(self, signals: StepSignals) -> torch.Tensor:
        """his x fut, each normalised to mean 1 per row, shared by the rows of one prompt."""
        score = normalise(signals.attention.float())
        future = signals.future(signals.timestep)
        if future is not None:
            score = score * normalise(future.float())
        return share_across_cfg(score, signals.cfg_groups)

    def select(self, signals: StepSignals) -> StepPlan:
        importance = self.importance(signals)
        score = importance
        if self.config.starvation_scale > 0 and signals.cached_count is not None:
            # rows sharing a selection share their cached counts too: no averaging needed
            score = importance * torch.exp(self.config.starvation_scale * signals.cached_count.float())
        compute = top_tokens(score, self.config.cache_ratio)
        # C2 is chosen on importance alone: starvation says how long a token has waited,
        # not how much its output moves, and its exponential would swamp the mass rule.
        return StepPlan(compute=compute, reuse=lowest_mass(importance, self.config.reuse_mass))


def lowest_mass(score: torch.Tensor, mass: float) -> torch.Tensor:
    """(B, N) True for the lowest-score tokens whose scores add up to at most `mass` of the total."""
    ordered, order = score.sort(dim=-1)
    within = ordered.cumsum(dim=-1) <= mass * ordered.sum(dim=-1, keepdim=True)
    return torch.zeros_like(within).scatter(-1, order, within)
