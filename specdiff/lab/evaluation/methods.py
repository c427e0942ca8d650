"""The benchmark's methods: specdiff's policies by name and options, other libraries' caches, fewer steps.

    full | full:steps=N | specdiff:cache_ratio=0.9,reset_steps=12/22 | fora | diffusers-taylorseer | ...
"""

from __future__ import annotations

import contextlib
import dataclasses

from specdiff.engine.policy import ConfigError

FULL = "full"


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
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(
                f"method option {item!r} must look like key=value (commas separate options; "
                f"step lists use slashes, e.g. reset_steps=12/22)"
            )
        fields[key.strip()] = _parse_value(value.strip())
    if name in PEERS:
        return MethodSpec(text, None, peer=(name, fields))
    if name in POLICIES:
        for field in dataclasses.fields(POLICIES[name][0]):
            if isinstance(field.default, tuple) and isinstance(fields.get(field.name), int):
                fields[field.name] = (fields[field.name],)  # a single step index
    try:
        config = config_for(name, **fields)
    except TypeError as error:
        raise ConfigError(f"{text}: {error}") from None
    return MethodSpec(text, config)


def _parse_value(value: str):
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value.startswith("(") or "/" in value:
        return tuple(int(v) for v in value.strip("()").replace("/", " ").split())
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value
