"""Every method, by name. Adding one = a new file and a line here."""

from __future__ import annotations

from specdiff.engine.policy import ConfigError, Policy, PolicyConfig
from specdiff.policies.first_block import FirstBlockCacheConfig, FirstBlockCachePolicy
from specdiff.policies.fora import FORAConfig, FORAPolicy
from specdiff.policies.full import FullComputeConfig, FullComputePolicy
from specdiff.policies.random_tokens import RandomTokensConfig, RandomTokensPolicy
from specdiff.policies.ras import RASConfig, RASPolicy
from specdiff.policies.specdiff import SpecDiffConfig, SpecDiffPolicy
from specdiff.policies.taylorseer import TaylorSeerConfig, TaylorSeerPolicy
from specdiff.policies.toca import ToCaConfig, ToCaPolicy

POLICIES: dict[str, tuple[type[PolicyConfig], type[Policy]]] = {
    SpecDiffConfig.method: (SpecDiffConfig, SpecDiffPolicy),
    FullComputeConfig.method: (FullComputeConfig, FullComputePolicy),
    RASConfig.method: (RASConfig, RASPolicy),
    RandomTokensConfig.method: (RandomTokensConfig, RandomTokensPolicy),
    FORAConfig.method: (FORAConfig, FORAPolicy),
    TaylorSeerConfig.method: (TaylorSeerConfig, TaylorSeerPolicy),
    FirstBlockCacheConfig.method: (FirstBlockCacheConfig, FirstBlockCachePolicy),
    ToCaConfig.method: (ToCaConfig, ToCaPolicy),
}


def register_policy(config_type: type[PolicyConfig], policy_type: type[Policy]) -> None:
    """Add a method from outside the library: its config class (a PolicyConfig dataclass whose `method`
    names it) and its policy. Registering the same pair again does nothing; another pair under a taken
    name is refused."""
    if not (isinstance(config_type, type) and issubclass(config_type, PolicyConfig)):
        raise ConfigError(f"register_policy: {config_type!r} is not a PolicyConfig subclass")
    if not (isinstance(policy_type, type) and issubclass(policy_type, Policy)):
        raise ConfigError(f"register_policy: {policy_type!r} is not a Policy subclass")
    name = config_type.method
    if not isinstance(name, str) or not name or name != name.strip() or ":" in name or "," in name:
        raise ConfigError(f"register_policy: {config_type.__name__}.method must be a name without ':' or ',', got {name!r}")
    if POLICIES.get(name, (config_type, policy_type)) != (config_type, policy_type):
        raise ConfigError(f"register_policy: the method name {name!r} is taken by {POLICIES[name][0].__name__}")
    POLICIES[name] = (config_type, policy_type)


def make_policy(config: PolicyConfig) -> Policy:
    """The policy of a config, or of the registered config it subclasses."""
    by_config = {config_type: policy_type for config_type, policy_type in POLICIES.values()}
    for cls in type(config).__mro__:
        if cls in by_config:
            return by_config[cls](config)
    known = ", ".join(c.__name__ for c, _ in POLICIES.values())
    raise ConfigError(f"unknown config type {type(config).__name__}; expected one of: {known}")


def config_for(method: str, **fields) -> PolicyConfig:
    if method not in POLICIES:
        raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(POLICIES)}")
    return POLICIES[method][0](**fields)
