"""The engine and the one-call API on stock diffusers SD3 and FLUX pipelines (tiny, random weights)."""

from __future__ import annotations

import pytest
import torch

import specdiff
from specdiff.policies.registry import make_policy
from specdiff.lab.tiny_pipelines import tiny_flux_pipeline, tiny_qwenimage_pipeline, tiny_sd3_pipeline, tiny_wan_pipeline

from conftest import STEPS, generate  # the shared helper; the sd3 / flux fixtures come from conftest.py


CASES = {
    "sd3-cfg": (tiny_sd3_pipeline, dict(guidance_scale=5.0)),
    "sd35-dual-attention": (lambda: tiny_sd3_pipeline(dual_attention=True), dict(guidance_scale=5.0)),
    "flux-embedded-guidance": (tiny_flux_pipeline, dict(guidance_scale=3.5)),
    "flux-true-cfg": (tiny_flux_pipeline, dict(guidance_scale=3.5, negative_prompt="blurry", true_cfg_scale=2.0)),
    "qwenimage-true-cfg-batch-2-non-square": (tiny_qwenimage_pipeline, dict(
        negative_prompt="blurry", true_cfg_scale=3.0, num_images_per_prompt=2, height=48, width=64)),
    "wan-true-cfg-batch-2-non-square-9-frames": (tiny_wan_pipeline, dict(
        negative_prompt="blurry", guidance_scale=3.0, num_videos_per_prompt=2, height=48, width=64, num_frames=9,
        max_sequence_length=16)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_token_computed_matches_plain_model(case):
    build, extra = CASES[case]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    plain = generate(pipe, **extra)
    specdiff.enable(pipe, specdiff.SpecDiffConfig(cache_ratio=0.0, warmup_steps=1))
    try:
        fast = generate(pipe, **extra)
        summary = specdiff.summary(pipe)
    finally:
        specdiff.disable(pipe)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    sparse = [r for r in summary.real_steps() if r.kind == "sparse"]
    assert len(sparse) >= STEPS - 1  # the token-subset path really ran
    if "true-cfg" in case:
        assert {r.branch for r in summary.real_steps()} == {0, 1}


def test_disable_restores_exact_behaviour(sd3):
    transformer = sd3.transformer
    processors = dict(transformer.attn_processors)
    original_class = type(sd3)
    before = generate(sd3, guidance_scale=5.0)
    specdiff.enable(sd3, specdiff.SpecDiffConfig(cache_ratio=0.8, warmup_steps=2))
    accelerated = generate(sd3, guidance_scale=5.0)
    specdiff.disable(sd3)
    after = generate(sd3, guidance_scale=5.0)
    assert not torch.equal(accelerated, before)  # the cache did change something
    assert torch.equal(after, before)
    assert type(sd3) is original_class
    assert "forward" not in vars(transformer)
    assert all(transformer.attn_processors[k] is v for k, v in processors.items())
    assert not specdiff.is_enabled(sd3)


def test_other_instances_untouched():
    first, second = tiny_sd3_pipeline(seed=1), tiny_sd3_pipeline(seed=1)
    for p in (first, second):
        p.set_progress_bar_config(disable=True)
    expected = generate(second)
    specdiff.enable(first, specdiff.SpecDiffConfig(cache_ratio=0.9, warmup_steps=2))
    try:
        assert type(second) is not type(first)
        assert torch.equal(generate(second), expected)
        assert not specdiff.is_enabled(second)
    finally:
        specdiff.disable(first)


@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_no_state_leaks_between_generations(which, request):
    pipe = request.getfixturevalue(which)
    specdiff.enable(pipe, specdiff.SpecDiffConfig(cache_ratio=0.75, warmup_steps=2))
    try:
        first = generate(pipe, seed=3)
        # other batch sizes, a non-square size and another prompt in between
        generate(pipe, seed=5, num_images_per_prompt=2)
        generate(pipe, seed=6, prompt=["a cat", "two dogs on a long red sofa"], height=48, width=80)
        again = generate(pipe, seed=3)
    finally:
        specdiff.disable(pipe)
    assert torch.equal(first, again)


def test_batch_rows_get_their_own_selection(sd3):
    specdiff.enable(sd3, specdiff.SpecDiffConfig(cache_ratio=0.75, warmup_steps=2))
    try:
        batch = generate(sd3, prompt=["a red cat", "a blue dog"], guidance_scale=5.0)
    finally:
        specdiff.disable(sd3)
    assert batch.shape[0] == 2 and torch.isfinite(batch).all()


def test_bare_transformer_given_steps():
    pipe = tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    plain = generate(pipe)
    with pytest.raises(ValueError, match="speculative_steps"):
        specdiff.enable(pipe.transformer, specdiff.SpecDiffConfig(), num_inference_steps=STEPS)
    specdiff.enable(
        pipe.transformer, specdiff.SpecDiffConfig(cache_ratio=0.0, speculative_steps=0, warmup_steps=1),
        num_inference_steps=STEPS,
    )
    try:
        fast = generate(pipe)
        again = generate(pipe)
        summary = specdiff.summary(pipe.transformer)
    finally:
        specdiff.disable(pipe.transformer)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, plain, rtol=1e-5, atol=1e-5)
    assert len(summary.real_steps()) == STEPS


def test_a_bare_transformer_told_its_batch_is_cfg_shares_one_selection_per_prompt():
    """enable(transformer, cfg_batch=True): rows r and r + B/2 get one selection, as under the pipeline."""
    pipe = tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    config = specdiff.SpecDiffConfig(cache_ratio=0.75, speculative_steps=0, warmup_steps=2, reset_steps=())
    with pytest.raises(ValueError, match="cfg_batch"):
        specdiff.enable(pipe, config, cfg_batch=True)
    for cfg_batch in (False, True):
        plans = []
        with specdiff.accelerated(pipe.transformer, config, num_inference_steps=STEPS, cfg_batch=cfg_batch):
            specdiff.observe(pipe.transformer, lambda e: plans.append(e.plan.compute))
            generate(pipe, guidance_scale=5.0)
        sparse = [p for p in plans if p is not None]
        assert len(sparse) == STEPS - 2
        shared = all(torch.equal(p[0].sort().values, p[1].sort().values) for p in sparse)
        assert shared == cfg_batch


def test_bad_configs_name_the_field_and_range():
    with pytest.raises(specdiff.ConfigError, match=r"cache_ratio must be in \[0.0, 1.0\)"):
        specdiff.SpecDiffConfig(cache_ratio=1.0)
    with pytest.raises(specdiff.ConfigError, match="speculative_steps"):
        specdiff.SpecDiffConfig(speculative_steps=-1)
    with pytest.raises(specdiff.ConfigError, match="warmup_steps must be at least 1"):
        specdiff.SpecDiffConfig(warmup_steps=0)
    with pytest.raises(specdiff.ConfigError, match="reset_steps"):
        specdiff.SpecDiffConfig(reset_steps=[3])
    with pytest.raises(specdiff.ConfigError, match="metric"):
        specdiff.RASConfig(metric="max")
    with pytest.raises(specdiff.ConfigError, match="unknown method"):
        specdiff.config_for("teacache2")


def test_unsupported_models_are_refused(sd3):
    with pytest.raises(specdiff.UnsupportedModelError, match="SD3Transformer2DModel"):
        specdiff.enable(torch.nn.Linear(2, 2))
    with pytest.raises(specdiff.UnsupportedModelError, match="supported"):
        specdiff.enable(object())
    specdiff.enable(sd3)
    try:
        with pytest.raises(RuntimeError, match="already enabled"):
            specdiff.enable(sd3)
    finally:
        specdiff.disable(sd3)
    with pytest.raises(RuntimeError, match="not enabled"):
        specdiff.disable(sd3)


def test_an_error_mid_generation_leaves_no_state(sd3):
    specdiff.enable(sd3, specdiff.SpecDiffConfig(cache_ratio=0.75, warmup_steps=2))
    try:
        reference = generate(sd3, seed=2)

        def boom(*args, **kwargs):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            generate(sd3, seed=2, callback_on_step_end=lambda p, i, t, kw: boom() if i == 4 else kw)
        assert torch.equal(generate(sd3, seed=2), reference)
    finally:
        specdiff.disable(sd3)


@pytest.mark.parametrize("build", [tiny_sd3_pipeline, tiny_flux_pipeline])
def test_half_precision_follows_the_pipeline(build):
    pipe = build().to(dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    plain = generate(pipe)
    specdiff.enable(pipe, specdiff.SpecDiffConfig(cache_ratio=0.0, warmup_steps=1))
    try:
        exact = generate(pipe)
    finally:
        specdiff.disable(pipe)
    specdiff.enable(pipe, specdiff.SpecDiffConfig(cache_ratio=0.75, warmup_steps=2))
    try:
        fast = generate(pipe)
    finally:
        specdiff.disable(pipe)
    torch.testing.assert_close(exact, plain, rtol=0, atol=2e-2)
    assert torch.isfinite(fast).all()


def generate_with(pipe, config, **extra):
    """(images, summary) of one accelerated generation; the pipeline is restored afterwards."""
    specdiff.enable(pipe, config)
    try:
        return generate(pipe, **extra), specdiff.summary(pipe)
    finally:
        specdiff.disable(pipe)


@pytest.mark.parametrize("case", ["sd3-cfg", "flux-true-cfg"])
def test_speculation_with_or_without_cfg_rows_is_exact_at_ratio_zero(case):
    build, extra = CASES[case]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    plain = generate(pipe, **extra)
    for with_cfg in (False, True):
        config = specdiff.SpecDiffConfig(cache_ratio=0.0, warmup_steps=1, speculative_cfg=with_cfg)
        exact, summary = generate_with(pipe, config, **extra)
        torch.testing.assert_close(exact, plain, rtol=1e-5, atol=1e-5)
        speculative = [r for r in summary.records if r.phase == "speculative"]
        # FLUX true CFG makes a second transformer call per step; SD3's CFG rows ride in the same call
        branches = {0, 1} if with_cfg and case == "flux-true-cfg" else {0}
        assert len(speculative) == 2 * len(branches) and {r.branch for r in speculative} == branches
    fast, _ = generate_with(pipe, specdiff.SpecDiffConfig(cache_ratio=0.75, warmup_steps=2), **extra)
    assert torch.isfinite(fast).all()


@pytest.mark.parametrize("chunk_elements", [None, 64])
def test_attention_taps_equal_the_attention_the_model_computes(monkeypatch, chunk_elements):
    """With every image query sampled, the taps are the exact attention each image token receives;
    also when the taps run one head and one query at a time (a tiny chunk size forces both loops)."""
    pipe = tiny_sd3_pipeline()
    transformer = pipe.transformer
    n_img = (64 // 8 // 2) ** 2  # 64 px, VAE factor 8, patch 2
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 7, transformer.config.joint_attention_dim, generator=torch.Generator().manual_seed(1))
    pooled = torch.randn(2, transformer.config.pooled_projection_dim, generator=torch.Generator().manual_seed(2))
    call = dict(hidden_states=sample, encoder_hidden_states=text, pooled_projections=pooled,
                timestep=torch.tensor([500.0, 500.0]))

    expected = torch.zeros(2, n_img)
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(query, key, value, **kwargs):
        weights = torch.softmax(query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5, dim=-1)
        expected.add_(weights.mean(1)[:, :n_img, :n_img].sum(1))  # [image, text] order, heads averaged
        return real_sdpa(query, key, value, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
        with torch.no_grad():
            transformer(**call)
    assert expected.sum() > 0

    if chunk_elements is not None:
        import specdiff.engine.attention as attention

        monkeypatch.setattr(attention, "TAP_CHUNK_ELEMENTS_CPU", chunk_elements)
    config = specdiff.SpecDiffConfig(speculative_steps=0, warmup_steps=1, tap_queries=4096)
    specdiff.enable(transformer, config, num_inference_steps=STEPS)
    try:
        with torch.no_grad():
            transformer(**call)
        taps = transformer._specdiff_state.runtime._branches[0].attention
    finally:
        specdiff.disable(transformer)
    torch.testing.assert_close(taps, expected, rtol=1e-4, atol=1e-5)


def test_summary_splits_every_cached_token_into_reused_or_approximated(sd3):
    config = specdiff.SpecDiffConfig(cache_ratio=0.75, warmup_steps=1, reset_steps=(), reuse_mass=0.3)
    _, summary = generate_with(sd3, config, guidance_scale=5.0)
    sparse = [r for r in summary.real_steps() if r.kind == "sparse"]
    assert len(sparse) == STEPS - 1
    for r in sparse:
        assert r.computed == r.tokens // 4
        assert r.reused + r.approximated == pytest.approx(r.tokens - r.computed)
    # from the fourth step on, three outputs exist: the lowest tokens are reused, the others approximated
    later = [r for r in sparse if r.step >= 3]
    assert later and all(0 < r.reused < r.tokens - r.computed for r in later)
    assert "C2" in str(summary)


def test_taps_run_only_where_a_plan_reads_them(sd3):
    config = specdiff.SpecDiffConfig(cache_ratio=0.75, warmup_steps=2, reset_steps=(5,))
    _, summary = generate_with(sd3, config, guidance_scale=5.0)
    speculative = [r for r in summary.records if r.phase == "speculative"]
    assert speculative and all(r.tapped for r in speculative)  # the future maps
    real = summary.real_steps()
    # step s is tapped iff step s + 1 is sparse: not before the dense steps 1 and 5, not at the end
    assert [r.tapped for r in real] == [config.is_dense(r.step + 1) is False and r.step + 1 < STEPS for r in real]
    assert [r.tapped for r in real] == [False, True, True, True, False, True, True, False]
    assert summary.scoring_seconds > 0


def test_summary_reads_well_everywhere_and_outlives_disable(sd3):
    import json

    config = specdiff.SpecDiffConfig(cache_ratio=0.75, warmup_steps=2, reset_steps=())
    with specdiff.accelerated(sd3, config) as last_summary:
        generate(sd3, guidance_scale=5.0)
        during = last_summary()
    after = specdiff.summary(sd3)  # disabled now: the last summary is still there
    assert after is during
    as_dict = json.loads(json.dumps(after.to_dict()))
    assert len(as_dict["steps"]) == len(after.records) and as_dict["method"] == "specdiff"
    assert all(isinstance(step["computed"], int) for step in as_dict["steps"])
    text = str(after)
    assert "C2: tokens that copied" in text  # the legend
    assert len(repr(after)) < 200 and "<table>" in after._repr_html_()


@pytest.mark.parametrize("config, holds", [
    (specdiff.FullComputeConfig(), False), (specdiff.FORAConfig(interval=2), False),
    (specdiff.TaylorSeerConfig(interval=2, warmup_steps=1), False),
    (specdiff.RASConfig(cache_ratio=0.5, warmup_steps=2), True),
])
def test_key_value_caches_only_for_methods_that_read_them(sd3, config, holds):
    from specdiff.integration import _state_of

    seen = []

    def look(pipe, step, timestep, kwargs):
        seen.append(sum(slot.keys is not None for slots in _state_of(pipe).runtime.kv_slots for slot in slots))
        return kwargs

    with specdiff.accelerated(sd3, config):
        generate(sd3, callback_on_step_end=look)
    assert (max(seen) > 0) == holds


def test_timesteps_come_from_the_schedule_not_a_sync_per_call(sd3):
    """Reading the timestep with .item() on every call is a host-device sync per step on a GPU: the
    pipeline's schedule is read once per pass instead, and the values are the ones the model got."""
    seen, counted = [], {"item": 0}
    original_item = torch.Tensor.item

    def counting_item(self):
        counted["item"] += 1
        return original_item(self)

    config = specdiff.RASConfig(cache_ratio=0.5, warmup_steps=2)
    with specdiff.accelerated(sd3, config):
        remove = specdiff.observe(sd3, lambda event: seen.append(event.timestep))
        torch.Tensor.item = counting_item
        try:
            generate(sd3)
        finally:
            torch.Tensor.item = original_item
            remove()
    plain = {"item": 0}

    def counting_plain(self):
        plain["item"] += 1
        return original_item(self)

    torch.Tensor.item = counting_plain
    try:
        generate(sd3)
    finally:
        torch.Tensor.item = original_item
    # one check per pass, not one read per step
    assert counted["item"] - plain["item"] <= 2, (counted, plain)
    expected = sd3.scheduler.timesteps.float().tolist()
    assert seen == pytest.approx(expected[len(expected) - len(seen):])


def test_speculative_change_maps_reach_the_real_steps(sd3):
    """importance="spec-change": the speculative pass (3 dense steps, no taps) leaves one change map per
    step after its first, and every sparse real step reads the map at the nearest speculative timestep."""
    from specdiff.lab.studies import SpecDiffStudyConfig

    config = SpecDiffStudyConfig(cache_ratio=0.75, warmup_steps=2, reset_steps=(), speculative_steps=3,
                                 importance="spec-change")
    read = []
    specdiff.enable(sd3, config)
    try:
        specdiff.observe(sd3, lambda e: read.append((e.timestep, e.signals.future_change(e.timestep), e.plan.compute)))
        generate(sd3, guidance_scale=5.0)
        summary = specdiff.summary(sd3)
    finally:
        specdiff.disable(sd3)
    speculative = [r for r in summary.records if r.phase == "speculative"]
    assert len(speculative) == 3 and not any(r.tapped for r in speculative + summary.real_steps())
    maps = {tuple(m[0].tolist()) for _, m, _ in read if m is not None}
    assert len(maps) == 2  # two changes between three speculative steps
    for timestep, change, compute in read:
        assert change is not None and change.shape == (2, 16 * 16)  # CFG rows served by the conditional pass
        assert torch.isfinite(change).all() and (change >= 0).all()
    assert sum(c is not None for _, _, c in read) == STEPS - config.warmup_steps


def test_conditional_only_taps_are_the_conditional_rows_taps(sd3):
    """SpecDiff's taps read only a CFG batch's conditional rows ([uncond, cond]: the second half) and both
    halves' selection reads them (the study's tap_cfg=True reads both); at cache ratio 0 the output is
    still the plain model's."""
    from specdiff.lab.studies import SpecDiffStudyConfig

    first_sparse = {}
    for tap_cfg in (True, False):
        config = (SpecDiffStudyConfig(cache_ratio=0.75, warmup_steps=2, reset_steps=(), tap_cfg=True) if tap_cfg
                  else specdiff.SpecDiffConfig(cache_ratio=0.75, warmup_steps=2, reset_steps=()))
        specdiff.enable(sd3, config)
        try:
            seen = []
            specdiff.observe(sd3, lambda e: seen.append(e.signals.attention))
            generate(sd3, guidance_scale=5.0)
        finally:
            specdiff.disable(sd3)
        first_sparse[tap_cfg] = seen[config.warmup_steps]  # read after two dense steps: the same inputs
    both, conditional = first_sparse[True], first_sparse[False]
    assert both.shape == conditional.shape == (2, 16 * 16)
    assert not torch.allclose(both[0], both[1], atol=1e-3)  # the halves differ, so the check below can fail
    torch.testing.assert_close(conditional[0], both[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conditional[1], both[1], atol=1e-5, rtol=1e-5)

    plain = generate(sd3, guidance_scale=5.0)
    for speculative_cfg in (False, True):
        config = specdiff.SpecDiffConfig(cache_ratio=0.0, warmup_steps=1, speculative_cfg=speculative_cfg)
        exact, _ = generate_with(sd3, config, guidance_scale=5.0)
        torch.testing.assert_close(exact, plain, rtol=1e-5, atol=1e-5)
    own = SpecDiffStudyConfig(tap_cfg=False, share_cfg_selection=False)
    assert make_policy(own).tap_cfg  # rows with their own selection read their own taps
