"""The benchmark's methods: specdiff's policies by name and options, other libraries' caches, fewer steps.

    full | full:steps=N | specdiff:cache_ratio=0.9,reset_steps=12/22 | fora | specdiff:steps=14 | diffusers-taylorseer | ...

Any method composes with a step count (`steps=N`): the method runs N steps instead of the run's
--steps, and its schedule, whose defaults were chosen for REFERENCE_STEPS steps, is scaled to N
(scale_schedule) unless its fields are given explicitly.
"""

from __future__ import annotations

import contextlib
import dataclasses

from specdiff.engine.policy import ConfigError

FULL = "full"
REFERENCE_STEPS = 28  # the step count the methods' default schedules were chosen for


def scale_schedule(config, steps: int, given: set[str] = frozenset(), reference: int = REFERENCE_STEPS):
    """`config` with its step-indexed fields scaled from `reference` steps to `steps`, except the fields in
    `given` (the user's own choice for this count):
    - warmup_steps: the same share of the trajectory, max(1, round(w * steps / reference)) — the early,
      high-noise steps are a phase of the trajectory, not a number of steps;
    - reset_steps: each index at the same share, round(r * steps / reference), those at or past the
      end or inside the warm-up dropped — a dense refresh sits at a point of the trajectory;
    - intervals (FORA, ToCa, TaylorSeer) are kept: 1 / interval is already the share of full steps;
      SpecDiff's speculative_steps is kept: a look-ahead of a few steps of its own short schedule;
      thresholds and ratios are per step and need no scaling.
    So a method at N steps plans the same share of dense steps as at the reference count, within rounding."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(config)}
    changes = {}
    if "warmup_steps" in fields and "warmup_steps" not in given:
        changes["warmup_steps"] = max(1, round(config.warmup_steps * steps / reference))
    if "reset_steps" in fields and "reset_steps" not in given:
        warmup = changes.get("warmup_steps", config.warmup_steps)
        scaled = sorted({round(r * steps / reference) for r in config.reset_steps})
        changes["reset_steps"] = tuple(r for r in scaled if warmup <= r < steps)
    return dataclasses.replace(config, **changes) if changes else config


@dataclasses.dataclass
class MethodSpec:
    label: str
    config: object | None  # None = full compute, no engine
    peer: tuple[str, dict] | None = None  # another library's cache (evaluation/peers.py)
    steps: int | None = None  # "full:steps=N": full compute with fewer steps (None = the run's --steps)
    options: dict = dataclasses.field(default_factory=dict)  # for specdiff.enable, e.g. cuda_graphs

    @contextlib.contextmanager
    def active(self, pipe):
        """Enable this method on pipe for the duration of the block."""
        import specdiff

        if self.peer is not None:
            from specdiff.lab.evaluation.peers import diffusers_cache

            with diffusers_cache(pipe, *self.peer):
                yield None
            return
        if self.config is None:
            yield None
            return
        with specdiff.accelerated(pipe, self.config, **self.options) as get_summary:
            yield get_summary


def parse_method(text: str) -> MethodSpec:
    """'full', 'specdiff', or 'specdiff:cache_ratio=0.9,warmup_steps=3'."""
    from specdiff.lab.evaluation.peers import PEERS
    from specdiff.lab.studies import POLICIES, config_for

    name, _, rest = text.partition(":")
    if name == FULL and not rest:
        return MethodSpec(FULL, None)
    if name == FULL:
        key, _, value = rest.partition("=")
        if key != "steps" or not value.isdigit() or int(value) < 1:
            raise ConfigError(f"{text}: full compute takes only steps=N (N >= 1), e.g. full:steps=10")
        return MethodSpec(text, None, steps=int(value))
    fields = {}
    steps = None
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(
                f"method option {item!r} must look like key=value (commas separate options; "
                f"step lists use slashes, e.g. reset_steps=12/22)"
            )
        key, value = key.strip(), _parse_value(value.strip())
        if key == "steps":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{text}: steps must be an integer >= 1, got {value!r}")
            steps = value
            continue
        fields[key] = value
    if name in PEERS:
        if steps is not None:
            raise ConfigError(f"{text}: steps=N composes with specdiff's methods, not with other libraries' caches")
        return MethodSpec(text, None, peer=(name, fields))
    if name in POLICIES:
        for field in dataclasses.fields(POLICIES[name][0]):
            if isinstance(field.default, tuple) and isinstance(fields.get(field.name), int):
                fields[field.name] = (fields[field.name],)  # a single step index
    try:
        config = config_for(name, **fields)
    except TypeError as error:
        raise ConfigError(f"{text}: {error}") from None
    if steps is not None:
        config = scale_schedule(config, steps, given=set(fields))
    return MethodSpec(text, config, steps=steps)


def _parse_value(value: str):
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value.startswith("(") or "/" in value:
        try:
            return tuple(int(v) for v in value.strip("()").replace("/", " ").split())
        except ValueError:
            raise ConfigError(f"{value!r}: a list of steps takes integers separated by slashes, e.g. 12/22") from None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value
