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
his * fut without the starvation factor; CFG rows of
one prompt share one selection, and both his and fut come from the conditional
rows; attention is averaged over heads and summed over layers, from
`tap_queries` sampled image queries per layer.
"""

from __future__ import annotations

import dataclasses

import torch

from specdiff.engine.policy import (
    ConfigError,
    SpeedKnob,
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
        tap_include_text (bool, default False): whether text-token queries also count (MMDiT joint attention).
        share_cfg_selection (bool, default True): CFG rows of one prompt use one token selection.
        tap_cfg (bool, default False): the taps of a CFG batch read both halves (True) or the conditional
            rows only (False: half the taps' cost, as the speculative map is the conditional rows' unless
            speculative_cfg). With share_cfg_selection=False every row is tapped: each reads its own.
            Measured on both embedded models: False scores 0.0-0.2 dB better (BENCHMARKS.md section 13).
        speculative_cfg (bool, default False): run the speculative pass with the pipeline's classifier-free
            guidance (True, the paper's "same input" read literally) or on the conditional rows only
            (False: about half its cost; both CFG halves share the maps).
        importance (str, default "his-fut"): what ranks the tokens to compute, before the starvation term.
            "his-fut": attention received x the speculative map (the paper's; unchanged default).
            "his" / "fut": one of the two (the paper's ablations; "his" skips the speculative pass).
            "change": how fast the token's output moved when it last ran (no taps; the speculative
                pass is skipped whatever speculative_steps says). Measured on the embedded model, a token's last
                observed change predicts its next change with Spearman +0.62, while attention received
                predicts it negatively (-0.19; BENCHMARKS.md, the token-score study).
            "change-fut": change x the speculative map.
            "spec-change": how fast the token's output moved in the speculative pass, between the two
                speculative steps nearest the current timestep (no taps; needs speculative_steps >= 2).
        warmup_steps (int, default 4): steps at the start that compute every token.
        reset_steps (tuple of int, default (12, 22)): further steps (0-based) that compute every token.
    """

    method = "specdiff"
    speed_knob = SpeedKnob("cache_ratio", 0.3, 0.97)
    tuning_alternatives = {"importance": ("change",), "speculative_steps": (0, 1, 3), "warmup_steps": (2, 6),
                           "reset_steps": ((), (14,))}

    reset_steps: tuple[int, ...] = (12, 22)  # chosen by the sweeps in BENCHMARKS.md section 3
    cache_ratio: float = 0.9
    speculative_steps: int = 2
    starvation_scale: float = 1.0
    reuse_mass: float = 0.1
    tap_queries: int = 64
    tap_include_text: bool = False
    share_cfg_selection: bool = True
    tap_cfg: bool = False  # half the taps' cost at no loss (BENCHMARKS.md section 13)
    speculative_cfg: bool = False  # half the speculation's cost for -0.3 dB (BENCHMARKS.md section 3)
    importance: str = "his-fut"

    IMPORTANCE = ("his-fut", "his", "fut", "change", "change-fut", "spec-change")

    def validate(self) -> None:
        super().validate()
        check_range(self, "cache_ratio", 0.0, 1.0, high_open=True)
        check_int(self, "speculative_steps", 0, 10)
        check_range(self, "starvation_scale", 0.0, 10.0)
        check_range(self, "reuse_mass", 0.0, 1.0)
        check_int(self, "tap_queries", 1, 4096)
        if self.importance not in self.IMPORTANCE:
            raise ConfigError(f"SpecDiffConfig.importance must be one of {', '.join(self.IMPORTANCE)}, "
                              f"got {self.importance!r}")
        if "fut" in self.importance and self.importance != "his-fut" and self.speculative_steps == 0:
            raise ConfigError(f"SpecDiffConfig.importance={self.importance!r} reads the speculative map: "
                              "speculative_steps must be at least 1")
        if self.importance == "spec-change" and self.speculative_steps < 2:
            raise ConfigError("SpecDiffConfig.importance='spec-change' compares consecutive speculative steps: "
                              f"speculative_steps must be at least 2, got {self.speculative_steps}")


class SpecDiffPolicy(Policy):
    config: SpecDiffConfig
    reads_kv_cache = True

    @property
    def reads_observed_change(self) -> bool:
        return self.config.importance in ("change", "change-fut")

    @property
    def speculative_steps(self) -> int:
        # "his" and "change" read nothing of the speculative pass: no pass to pay for
        uses_speculation = "fut" in self.config.importance or self.config.importance == "spec-change"
        return self.config.speculative_steps if uses_speculation else 0

    @property
    def speculative_cfg(self) -> bool:
        return self.config.speculative_cfg

    @property
    def tap_queries(self) -> int:
        # taps measure attention received ("his") and feed the speculative map ("fut")
        return self.config.tap_queries if self.config.importance not in ("change", "spec-change") else 0

    @property
    def tap_include_text(self) -> bool:
        return self.config.tap_include_text

    @property
    def tap_cfg(self) -> bool:
        return self.config.tap_cfg or not self.config.share_cfg_selection

    def needs_attention_after(self, step: int, num_steps: int) -> bool:
        # only a sparse step reads the previous step's taps ("his"): skip them before dense steps, at the
        # end, and when the score does not use attention received
        uses_his = self.config.importance in ("his-fut", "his")
        return uses_his and step + 1 < num_steps and not self.config.is_dense(step + 1)

    def _ready(self, signals: StepSignals) -> bool:
        if self.config.importance in ("his-fut", "his"):
            return signals.attention is not None
        if self.config.importance == "fut":
            return signals.future(signals.timestep) is not None or signals.attention is not None
        if self.config.importance == "spec-change":
            return signals.future_change(signals.timestep) is not None
        return signals.observed_change is not None

    def importance(self, signals: StepSignals) -> torch.Tensor:
        """The chosen signals, each normalised to mean 1 per row, multiplied."""
        kind = self.config.importance
        future = signals.future(signals.timestep) if "fut" in kind else None
        if kind == "spec-change":
            score = normalise(signals.future_change(signals.timestep).float())
        elif kind in ("change", "change-fut"):
            score = normalise(signals.observed_change.float())
        elif kind == "fut" and future is not None:
            score, future = normalise(future.float()), None
        else:  # "his-fut", "his", and "fut" before any speculative map exists
            score = normalise(signals.attention.float())
        if future is not None:
            score = score * normalise(future.float())
        if self.config.share_cfg_selection:
            score = share_across_cfg(score, signals.cfg_groups)
        return score

    def dense_step(self, signals: StepSignals) -> bool:
        return self.config.is_dense(signals.step) or not self._ready(signals)

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
