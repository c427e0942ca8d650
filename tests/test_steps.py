"""Every method composes with a step count (`method:steps=N` in bench): its schedule is scaled from the
count its defaults were chosen for, so that it plans the same share of dense steps, within rounding."""

from __future__ import annotations

import pytest

from specdiff.engine.policy import ConfigError, DenseScheduleConfig
from specdiff.lab.evaluation.methods import REFERENCE_STEPS, parse_method
from specdiff.lab.studies import POLICIES
from specdiff.policies.block_cache import full_step
from specdiff.policies.first_block import FirstBlockCacheConfig
from specdiff.policies.fora import FORAConfig
from specdiff.policies.full import FullComputeConfig


def dense_share(config, steps: int) -> float:
    """Share of the steps a method's schedule plans in full (every token, every block)."""
    if isinstance(config, DenseScheduleConfig):
        dense = [config.is_dense(s) for s in range(steps)]
    elif isinstance(config, FORAConfig):
        dense = [s % config.interval == 0 for s in range(steps)]
    elif isinstance(config, FirstBlockCacheConfig):
        dense = [s < config.warmup_steps for s in range(steps)]  # the rest depends on the outputs
    elif isinstance(config, FullComputeConfig):
        dense = [True] * steps
    else:  # ToCa, TaylorSeer
        dense = [full_step(s, config.warmup_steps, config.interval) for s in range(steps)]
    return sum(dense) / steps


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("steps", [7, 10, 14, 20])
def test_a_method_at_fewer_steps_plans_the_same_share_of_dense_steps(name, steps):
    spec = parse_method(f"{name}:steps={steps}")
    reference = parse_method(name).config
    assert spec.steps == steps and type(spec.config) is type(reference)
    if reference is None:  # full: fewer steps is the method itself
        return
    # each of warm-up and the resets rounds to the nearest step: at most half a step each
    rounding = (1 + len(getattr(reference, "reset_steps", ()))) * 0.5 / steps + 1 / steps
    assert abs(dense_share(spec.config, steps) - dense_share(reference, REFERENCE_STEPS)) <= rounding, spec.config


def test_the_scaled_schedule_of_specdiff_at_14_steps():
    spec = parse_method("specdiff:steps=14")
    assert (spec.config.warmup_steps, spec.config.reset_steps, spec.config.speculative_steps) == (2, (6, 11), 2)
    assert parse_method("fora:steps=10").config.interval == 3  # the share of full steps is 1 / interval already


def test_fields_given_with_the_steps_are_kept():
    spec = parse_method("ras:steps=14,warmup_steps=4,reset_steps=9")
    assert (spec.config.warmup_steps, spec.config.reset_steps) == (4, (9,))


@pytest.mark.parametrize("text, message", [
    ("specdiff:steps=0", "steps must be an integer >= 1"),
    ("specdiff:steps=x", "steps must be an integer >= 1"),
    ("diffusers-taylorseer:steps=10", "not with other libraries' caches"),
    ("ras:reset_steps=a/b", "integers separated by slashes"),
])
def test_bad_step_options_are_named(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_method(text)


def test_bench_runs_a_cache_on_fewer_steps_beside_plain_fewer_steps(tmp_path):
    import json

    from specdiff.lab.cli import main

    assert main(["bench", "--model", "tiny-sd3", "--methods", "full", "full:steps=4", "ras:steps=6", "--steps", "8",
                 "--num-prompts", "2", "--batch-size", "2", "--out", str(tmp_path)]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["summary"]}
    # 4 plain steps of 8 halve the FLOPs; RAS on 6 of 8 steps cuts more than 8 / 6
    assert rows["full:steps=4"]["flops_ratio"] == pytest.approx(2.0, rel=0.02)
    assert rows["ras:steps=6"]["flops_ratio"] > 8 / 6
