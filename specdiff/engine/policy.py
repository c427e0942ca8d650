"""The policy contract the engine asks: a typed, validated config and "which tokens run this step"."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Callable, ClassVar

import torch


class ConfigError(ValueError):
    """A config field holds a value outside its allowed range."""


def check_range(config, name: str, low: float, high: float, *, low_open=False, high_open=False) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{type(config).__name__}.{name} must be a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{type(config).__name__}.{name} must be in {interval}, got {value!r}")


def check_int(config, name: str, low: int, high: int | None = None) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{type(config).__name__}.{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        upper = "" if high is None else f", at most {high}"
        raise ConfigError(f"{type(config).__name__}.{name} must be at least {low}{upper}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Base of every method's config. `method` names it in the registry."""

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self._check_field_types()
        self.validate()

    def _check_field_types(self) -> None:
        """Every field holds its declared type: a bool field a real bool (the string "false" is truthy),
        a float field a finite number or an int (NaN passes every range check), an int field an int."""
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value, kind = getattr(self, field.name), hints.get(field.name)
            where = f"{type(self).__name__}.{field.name}"
            if kind is bool and not isinstance(value, bool):
                raise ConfigError(f"{where} must be True or False, got {value!r}")
            if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
                raise ConfigError(f"{where} must be a finite number, got {value!r}")
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{where} must be an integer, got {value!r}")

    def validate(self) -> None:  # overridden by each config
        pass


@dataclasses.dataclass(frozen=True)
class DenseScheduleConfig(PolicyConfig):
    """Shared by the token-skipping methods: which steps run every token.

    warmup_steps: the first steps of the real run that compute every token.
    reset_steps: further step indices (0-based) that compute every token,
      refreshing every cached output ("error reset" in RAS).
    """

    warmup_steps: int = 4
    reset_steps: tuple[int, ...] = ()

    def validate(self) -> None:
        check_int(self, "warmup_steps", 1)
        if not isinstance(self.reset_steps, tuple) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.reset_steps
        ):
            raise ConfigError(
                f"{type(self).__name__}.reset_steps must be a tuple of step indices >= 0, got {self.reset_steps!r}"
            )

    def is_dense(self, step: int) -> bool:
        return step < self.warmup_steps or step in self.reset_steps


@dataclasses.dataclass
class StepSignals:
    """What a policy may look at when it plans a step of one branch."""

    step: int
    num_steps: int
    timestep: float
    batch: int
    num_tokens: int
    device: torch.device
    attention: torch.Tensor | None  # (B, N) attention received in the previous real step
    future: Callable[[float], torch.Tensor | None]  # speculative attention for a timestep
    cached_count: torch.Tensor | None  # (B, N) steps each token has gone uncomputed
    last_outputs: list[torch.Tensor]  # most recent first, (B, N, P)
    cfg_groups: int  # rows r and r + B / cfg_groups belong to one prompt (1 = no sharing)
    generator: torch.Generator
    observed_change: torch.Tensor | None = None  # (B, N) output change rate when each token last ran
    # (B, N) output change rate the speculative pass saw at the nearest speculative timestep (None: none)
    future_change: Callable[[float], torch.Tensor | None] = lambda timestep: None
    # the policy's step_inputs, on the device (persistent buffers); empty on dense steps
    inputs: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """compute: (B, n) image tokens that run (None = all); reuse: (B, N) True where
    a non-computed token copies its last output, False where it is approximated
    from its last three (None = every non-computed token copies)."""

    compute: torch.Tensor | None = None
    reuse: torch.Tensor | None = None


DENSE = StepPlan()


@dataclasses.dataclass(frozen=True)
class BlockCall:
    """One transformer block call that a block-level policy decides about."""

    index: int  # position of the block in the step, 0 .. count - 1
    count: int  # blocks per step
    step: int
    num_steps: int
    tokens: torch.Tensor  # (B, N, D) image stream going in
    text: torch.Tensor | None  # text stream going in
    run: Callable[..., tuple]  # run(tokens, text, active=None) -> (text, tokens); `active` (B, n) runs a subset


class BlockResult(typing.NamedTuple):
    text: torch.Tensor | None
    tokens: torch.Tensor
    work: float  # share of the block's work done (1 = it ran, 0 = reused), shown by specdiff.summary


class Policy:
    """Decides, per step, which image tokens run and how the others are filled."""

    config: PolicyConfig

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config

    @property
    def speculative_steps(self) -> int:
        return 0

    @property
    def speculative_cfg(self) -> bool:
        return True

    @property
    def tap_queries(self) -> int:
        """Sampled image queries per attention layer that measure the attention each token receives
        (0: this policy reads no attention)."""
        return 0

    @property
    def tap_include_text(self) -> bool:
        """Whether text-token queries count too."""
        return False

    @property
    def tap_cfg(self) -> bool:
        """Whether the taps of a CFG batch read the unconditional rows too (False: the conditional rows
        only, and the unconditional rows take their maps)."""
        return True

    def needs_attention_after(self, step: int, num_steps: int) -> bool:
        """Whether step `step`'s attention taps will be read (by the plan of step + 1)."""
        return self.tap_queries > 0

    block_level = False  # True: run_block decides per transformer block
    reads_kv_cache = False  # True: its sparse steps attend to cached keys / values of all image tokens
    reads_observed_change = False  # True: its plans read StepSignals.observed_change (tracked only then)

    def new_block_state(self):
        """Block-level policies: a fresh per-branch state (their own dataclass), made at a branch's first step."""
        return None

    # A step is planned in two parts, so that a step can be replayed from a CUDA graph: `dense_step` on the
    # host (which tensors exist, the step index; it reads no tensor's values), then, for a sparse step,
    # `select` as device work only: fixed shapes for a given token count, no host sync, no host value
    # that changes from step to step (those come in through `step_inputs`).
    def dense_step(self, signals: StepSignals) -> bool:
        """Host only: whether this step runs every image token."""
        return True

    def select(self, signals: StepSignals) -> StepPlan:
        """Device only: the plan of a sparse step (called when dense_step is False)."""
        raise NotImplementedError(f"{type(self).__name__} has no sparse steps")

    def step_inputs(self, signals: StepSignals) -> dict[str, torch.Tensor]:
        """Host values a sparse step's select reads, as CPU tensors (e.g. random draws); the engine
        copies them into persistent device buffers, read as signals.inputs[name]."""
        return {}

    def plan(self, signals: StepSignals) -> StepPlan:
        """Both parts: DENSE or the sparse plan (step_inputs copied to the signals' device)."""
        if self.dense_step(signals):
            return DENSE
        inputs = {name: value.to(signals.device) for name, value in self.step_inputs(signals).items()}
        return self.select(dataclasses.replace(signals, inputs=inputs) if inputs else signals)

    def run_block(self, state, call: "BlockCall") -> "BlockResult":
        """Block-level policies only: run, reuse or predict block `call.index` of this step."""
        text, tokens = call.run(call.tokens, call.text)
        return BlockResult(text, tokens, 1.0)


def share_across_cfg(scores: torch.Tensor, groups: int) -> torch.Tensor:
    """Average each prompt's scores over its CFG rows so they share one selection."""
    if groups <= 1:
        return scores
    per_prompt = scores.reshape(groups, -1, scores.shape[-1]).mean(0)
    return per_prompt.repeat(groups, 1)


def normalise(scores: torch.Tensor) -> torch.Tensor:
    """Scale each row to mean 1 so products of scores do not depend on their units."""
    return scores / scores.mean(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def top_tokens(scores: torch.Tensor, cache_ratio: float) -> torch.Tensor:
    """(B, n) indices of the (1 - cache_ratio) highest-scoring tokens, n >= 1."""
    count = max(1, round((1.0 - cache_ratio) * scores.shape[-1]))
    return scores.topk(count, dim=-1, sorted=False).indices
