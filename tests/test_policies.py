"""Every method as a policy of the one engine: exact when told to compute everything,
FLOPs as its schedule predicts with its defaults, no state carried between calls."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import specdiff
from specdiff.lab.evaluation.flops import _extra_mapping
from specdiff.lab.studies import SpecDiffStudyConfig  # registers the lab's study method
from conftest import generate as shared_generate
from specdiff.lab.tiny_pipelines import (tiny_flux2_klein_pipeline, tiny_flux_pipeline, tiny_qwenimage_pipeline,
                                        tiny_sd3_pipeline, tiny_wan_pipeline, tiny_zimage_pipeline)

STEPS = 6
ALWAYS_COMPUTE = {
    "specdiff": specdiff.SpecDiffConfig(cache_ratio=0.0, warmup_steps=1),
    "specdiff-study": SpecDiffStudyConfig(cache_ratio=0.0, warmup_steps=1, importance="change"),
    "ras": specdiff.RASConfig(cache_ratio=0.0, warmup_steps=1, reset_steps=()),
    "random": specdiff.RandomTokensConfig(cache_ratio=0.0, warmup_steps=1),
    "fora": specdiff.FORAConfig(interval=1),
    "taylorseer": specdiff.TaylorSeerConfig(interval=1),
    "firstblock": specdiff.FirstBlockCacheConfig(threshold=0.0),
    "toca": specdiff.ToCaConfig(recompute_ratio=1.0, interval=2),
    "full": specdiff.FullComputeConfig(),
}
DEFAULTS = {
    "specdiff": specdiff.SpecDiffConfig(warmup_steps=2),
    "ras": specdiff.RASConfig(warmup_steps=2, reset_steps=(5,)),
    "random": specdiff.RandomTokensConfig(warmup_steps=2),
    "fora": specdiff.FORAConfig(),
    "taylorseer": specdiff.TaylorSeerConfig(interval=3, warmup_steps=2),
    "toca": specdiff.ToCaConfig(interval=3, warmup_steps=2, recompute_ratio=0.25),
}


def test_every_registered_method_is_covered():
    assert set(ALWAYS_COMPUTE) == set(specdiff.POLICIES)


@pytest.fixture(scope="module", params=["sd3", "flux", "flux2", "qwenimage", "wan", "zimage"])
def pipe(request):
    make = {"sd3": lambda: tiny_sd3_pipeline(layers=3), "flux": lambda: tiny_flux_pipeline(single_layers=2),
            "flux2": tiny_flux2_klein_pipeline, "qwenimage": tiny_qwenimage_pipeline, "wan": tiny_wan_pipeline,
            "zimage": tiny_zimage_pipeline}[request.param]
    pipe = make()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed=0, **extra):
    return shared_generate(pipe, seed, STEPS, **extra)


@pytest.mark.parametrize("method", list(ALWAYS_COMPUTE))
def test_always_compute_setting_matches_full_compute(pipe, method):
    plain = generate(pipe)
    specdiff.enable(pipe, ALWAYS_COMPUTE[method])
    try:
        out = generate(pipe)
    finally:
        specdiff.disable(pipe)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", list(DEFAULTS))
def test_no_state_leaks(pipe, method):
    specdiff.enable(pipe, DEFAULTS[method])
    try:
        first = generate(pipe, seed=4)
        generate(pipe, seed=9, num_images_per_prompt=2, height=48, width=64)
        again = generate(pipe, seed=4)
    finally:
        specdiff.disable(pipe)
    assert torch.equal(first, again)


def transformer_calls_flops(pipe) -> list[int]:
    counter = FlopCounterMode(display=False, custom_mapping=_extra_mapping())
    marks = []
    hooks = [
        pipe.transformer.register_forward_pre_hook(lambda *a: marks.append(counter.get_total_flops())),
        pipe.transformer.register_forward_hook(lambda *a: marks.append(counter.get_total_flops())),
    ]
    try:
        with counter:
            generate(pipe, output_type="latent")
    finally:
        for h in hooks:
            h.remove()
    return [marks[i + 1] - marks[i] for i in range(0, len(marks), 2)]


@pytest.mark.parametrize("method", ["fora", "taylorseer", "toca"])
def test_block_caches_cut_flops_as_scheduled(pipe, method):
    dense = transformer_calls_flops(pipe)[0]
    specdiff.enable(pipe, DEFAULTS[method])
    try:
        calls = transformer_calls_flops(pipe)
        summary = specdiff.summary(pipe)
    finally:
        specdiff.disable(pipe)
    policy_full = [r.blocks_computed == 1.0 for r in summary.records]
    if method == "fora":
        assert policy_full == [s % 3 == 0 for s in range(STEPS)]
    else:
        assert policy_full == [s < 2 or (s - 2) % 3 == 0 for s in range(STEPS)]
    for full, record, flops in zip(policy_full, summary.records, calls):
        if full:
            assert flops == dense
        elif method == "toca":
            # a quarter of the image tokens (plus all text) through every block
            assert record.blocks_computed == pytest.approx(0.25, abs=0.01)
            assert 0.2 * dense < flops < 0.9 * dense
        else:  # embedding and head only; Z-Image's refiner layers (2 of the tiny model's 4) run every step
            assert flops < (0.4 if type(pipe).__name__ == "ZImagePipeline" else 0.2) * dense


def test_first_block_cache_skips_when_the_first_block_barely_changes(pipe):
    specdiff.enable(pipe, specdiff.FirstBlockCacheConfig(threshold=10.0))  # skips whenever it can
    try:
        generate(pipe)
        summary = specdiff.summary(pipe)
    finally:
        specdiff.disable(pipe)
    first = [r.blocks_computed for r in summary.records if r.step == 0]
    later = [r.blocks_computed for r in summary.records if r.step > 0]
    assert first and all(r == 1.0 for r in first)  # nothing cached yet (each CFG call's own first step)
    assert later and all(r < 1.0 for r in later)


def test_the_random_ablation_has_specdiffs_schedule_by_default():
    random_config, specdiff_config = specdiff.RandomTokensConfig(), specdiff.SpecDiffConfig()
    assert (random_config.warmup_steps, random_config.reset_steps, random_config.cache_ratio) == \
        (specdiff_config.warmup_steps, specdiff_config.reset_steps, specdiff_config.cache_ratio)


def _signals(batch=1, tokens=10, **fields):
    from specdiff.engine.policy import StepSignals

    base = dict(step=10, num_steps=28, timestep=500.0, batch=batch, num_tokens=tokens, device=torch.device("cpu"),
                attention=torch.ones(batch, tokens), future=lambda t: None, cached_count=torch.zeros(batch, tokens),
                last_outputs=[torch.zeros(batch, tokens, 4)] * 3, cfg_groups=1, generator=torch.Generator())
    return StepSignals(**{**base, **fields})


def test_specdiff_change_importance_computes_the_tokens_that_moved_most():
    from specdiff.lab.studies import SpecDiffStudyConfig as StudyConfig, SpecDiffStudyPolicy as SpecDiffPolicy

    change = torch.tensor([[0.1, 5.0, 0.2, 0.3, 4.0, 0.1, 0.2, 0.1, 0.3, 0.2]])
    attention = torch.tensor([[9.0, 0.1, 9.0, 1, 0.1, 1, 1, 1, 1, 1]])  # points the other way
    signals = _signals(attention=attention, observed_change=change)
    for importance, expected in (("change", {1, 4}), ("his", {0, 2})):
        policy = SpecDiffPolicy(StudyConfig(cache_ratio=0.8, starvation_scale=0.0, importance=importance))
        assert set(policy.plan(signals).compute[0].tolist()) == expected
    # before any change was observed the step runs in full
    policy = SpecDiffPolicy(StudyConfig(importance="change"))
    assert policy.plan(_signals(observed_change=None)).compute is None
    assert policy.speculative_steps == 0 and policy.tap_queries == 0  # no taps, no speculative pass
    assert SpecDiffPolicy(StudyConfig()).speculative_steps == 2  # the paper's default unchanged


def test_specdiff_importance_is_validated():
    from specdiff.lab.studies import SpecDiffStudyConfig

    with pytest.raises(specdiff.ConfigError, match="importance must be one of"):
        SpecDiffStudyConfig(importance="edges")
    with pytest.raises(specdiff.ConfigError, match="speculative_steps must be at least 1"):
        SpecDiffStudyConfig(importance="fut", speculative_steps=0)
    with pytest.raises(specdiff.ConfigError, match="speculative_steps must be at least 2"):
        SpecDiffStudyConfig(importance="spec-change", speculative_steps=1)
    with pytest.raises(TypeError):  # the library's SpecDiff is the paper's score only
        specdiff.SpecDiffConfig(importance="change")


def test_specdiff_speculative_change_importance_follows_the_speculative_pass():
    from specdiff.lab.studies import SpecDiffStudyConfig, SpecDiffStudyPolicy as SpecDiffPolicy

    moved = torch.tensor([[0.1, 0.2, 6.0, 0.3, 0.1, 0.2, 5.0, 0.1, 0.3, 0.2]])
    attention = torch.tensor([[9.0, 9.0, 0.1, 1, 1, 1, 0.1, 1, 1, 1]])  # points elsewhere
    observed = torch.tensor([[3.0, 4.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]])  # so does the real history
    policy = SpecDiffPolicy(SpecDiffStudyConfig(cache_ratio=0.8, starvation_scale=0.0, importance="spec-change"))
    signals = _signals(attention=attention, observed_change=observed, future_change=lambda t: moved)
    assert set(policy.plan(signals).compute[0].tolist()) == {2, 6}
    assert policy.plan(_signals()).compute is None  # no speculative change measured: the step runs in full
    assert policy.speculative_steps == 2 and policy.tap_queries == 0  # the pass runs, taps do not


def test_history_observes_change_only_where_tokens_ran():
    from specdiff.engine.history import TokenHistory

    assert TokenHistory().track_change is False  # tracked only for policies that read it
    history = TokenHistory(track_change=True)
    history.record(torch.zeros(1, 4, 2), None, 1000.0)
    history.record(torch.ones(1, 4, 2), None, 900.0)  # every token moved by sqrt(2) over 100
    assert torch.allclose(history.observed_change, torch.full((1, 4), 2 ** 0.5 / 100))
    moved = torch.ones(1, 4, 2)
    moved[0, 2] = 11.0  # token 2 ran and moved by 10 * sqrt(2); token 0 "moved" but did not run
    moved[0, 0] = 50.0
    history.record(moved, torch.tensor([[2, 3]]), 800.0)
    expected = torch.tensor([[2 ** 0.5 / 100, 2 ** 0.5 / 100, 10 * 2 ** 0.5 / 100, 0.0]])
    assert torch.allclose(history.observed_change, expected)
