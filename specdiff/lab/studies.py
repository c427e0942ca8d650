"""`specdiff-study`: SpecDiff with the switches the project's studies used, registered from the lab.
The lab imports POLICIES and config_for from here, so that every lab command knows this method.

The library's SpecDiffConfig is the paper's method plus the settings a user tunes. The token-score
study (BENCHMARKS.md, "which signal") and the CFG ablations compared other scores and taps; they run
as `specdiff-study:importance=change` etc. in `specdiff bench`, `tune --methods` and the benchmarks.
"""

from __future__ import annotations

import dataclasses

import torch

from specdiff.engine.policy import ConfigError, StepSignals, normalise, share_across_cfg
from specdiff.policies.registry import POLICIES, config_for, register_policy  # noqa: F401 (the lab's view)
from specdiff.policies.specdiff import SpecDiffConfig, SpecDiffPolicy


@dataclasses.dataclass(frozen=True)
class SpecDiffStudyConfig(SpecDiffConfig):
    """SpecDiff's fields, and:

    importance (str, default "his-fut"): what ranks the tokens to compute, before the starvation term.
        "his-fut": attention received x the speculative map (the paper's; the library's SpecDiff).
        "his" / "fut": one of the two (the paper's ablations; "his" skips the speculative pass).
        "change": how fast the token's output moved when it last ran (no taps, no speculative pass).
            On the embedded model a token's last observed change predicts its next change with
            Spearman +0.62, while attention received predicts it negatively (BENCHMARKS.md).
        "change-fut": change x the speculative map.
        "spec-change": how fast the token's output moved in the speculative pass, between the two
            speculative steps nearest the current timestep (no taps; speculative_steps >= 2).
    tap_include_text (bool, default False): text-token queries count in the taps too (joint attention).
    share_cfg_selection (bool, default True): CFG rows of one prompt use one token selection.
    tap_cfg (bool, default False): the taps of a CFG batch read both halves (True) or the conditional rows
        only (False, as the library's SpecDiff). With share_cfg_selection=False every row is tapped.
    """

    method = "specdiff-study"

    importance: str = "his-fut"
    tap_include_text: bool = False
    share_cfg_selection: bool = True
    tap_cfg: bool = False

    IMPORTANCE = ("his-fut", "his", "fut", "change", "change-fut", "spec-change")

    def validate(self) -> None:
        super().validate()
        if self.importance not in self.IMPORTANCE:
            raise ConfigError(f"SpecDiffStudyConfig.importance must be one of {', '.join(self.IMPORTANCE)}, "
                              f"got {self.importance!r}")
        if "fut" in self.importance and self.importance != "his-fut" and self.speculative_steps == 0:
            raise ConfigError(f"SpecDiffStudyConfig.importance={self.importance!r} reads the speculative map: "
                              "speculative_steps must be at least 1")
        if self.importance == "spec-change" and self.speculative_steps < 2:
            raise ConfigError("SpecDiffStudyConfig.importance='spec-change' compares consecutive speculative steps: "
                              f"speculative_steps must be at least 2, got {self.speculative_steps}")


class SpecDiffStudyPolicy(SpecDiffPolicy):
    config: SpecDiffStudyConfig

    @property
    def reads_observed_change(self) -> bool:
        return self.config.importance in ("change", "change-fut")

    @property
    def speculative_steps(self) -> int:
        # "his" and "change" read nothing of the speculative pass: no pass to pay for
        uses_speculation = "fut" in self.config.importance or self.config.importance == "spec-change"
        return self.config.speculative_steps if uses_speculation else 0

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
        uses_his = self.config.importance in ("his-fut", "his")
        return uses_his and super().needs_attention_after(step, num_steps)

    def dense_step(self, signals: StepSignals) -> bool:
        return self.config.is_dense(signals.step) or not self._ready(signals)

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


register_policy(SpecDiffStudyConfig, SpecDiffStudyPolicy)
