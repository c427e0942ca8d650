"""Wan: what its adapter refuses, and its RoPE rows (the generic tests run every method on the tiny Wan
text-to-video pipeline too: test_policies.py, test_graphs.py, test_engine.py with 9 frames)."""

from __future__ import annotations

import pytest
import torch

import specdiff
from specdiff.adapters.wan import rope_rows, rotate


def test_rows_of_the_active_tokens_rotate_as_the_full_sequence():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 2, 8)  # (B, S, H, D)
    cos, sin = torch.randn(1, 6, 1, 8), torch.randn(1, 6, 1, 8)
    active = torch.tensor([[0, 4], [5, 2]])
    picked = rope_rows((cos, sin), active)
    assert picked[0].shape == (2, 2, 1, 8)
    full = rotate(x, cos, sin)
    subset = torch.stack([x[b, active[b]] for b in range(2)])
    torch.testing.assert_close(rotate(subset, *picked), torch.stack([full[b, active[b]] for b in range(2)]))


@pytest.fixture(scope="module")
def two_stage():
    from specdiff.lab.tiny_pipelines import tiny_wan_pipeline

    pipe = tiny_wan_pipeline(two_stage=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _video(pipe, **extra):
    return pipe(prompt="a red cat", negative_prompt="blurry", guidance_scale=3.0, num_inference_steps=8, height=64,
                width=48, num_frames=5, max_sequence_length=16, output_type="latent",
                generator=torch.Generator().manual_seed(0), **extra).frames


def test_both_transformers_of_a_two_stage_pipeline_run_accelerated_and_exact_at_full_compute(two_stage):
    """Wan 2.2 A14B: transformer for the high-noise steps, transformer_2 below the boundary; each keeps
    its own engine state, and with every token computed the video equals plain diffusers'."""
    plain = _video(two_stage)
    for config in (specdiff.SpecDiffConfig(cache_ratio=0.0, warmup_steps=1), specdiff.FORAConfig(interval=1)):
        with specdiff.accelerated(two_stage, config):
            out = _video(two_stage)
            first, second = specdiff.summary(two_stage), specdiff.summary(two_stage.transformer_2)
        torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
        steps = lambda summary: {r.step for r in summary.records if r.phase == "real"}  # noqa: E731
        # the boundary splits the 8 steps: each stage counts its own from 0, both CFG calls per step
        assert steps(first) and steps(second) and len(steps(first)) + len(steps(second)) == 8
        assert {r.branch for r in second.records if r.phase == "real"} == {0, 1}
    assert torch.equal(_video(two_stage), plain)


def test_a_two_stage_pipeline_caches_in_both_stages_and_keeps_their_states_apart(two_stage):
    config = specdiff.SpecDiffConfig(cache_ratio=0.75, warmup_steps=1, reset_steps=())
    specdiff.enable(two_stage, config)
    try:
        first_state = two_stage.transformer._specdiff_state
        second_state = two_stage.transformer_2._specdiff_state
        assert first_state.runtime is not second_state.runtime and first_state.adapter is not second_state.adapter
        first = _video(two_stage)
        again = _video(two_stage)
        for transformer in (two_stage.transformer, two_stage.transformer_2):
            kinds = [r.kind for r in specdiff.summary(transformer).records if r.phase == "real" and r.branch == 0]
            assert kinds[0] == "dense" and "sparse" in kinds  # each stage warms up on its own first step
        with pytest.raises(RuntimeError, match="through its pipeline"):
            specdiff.disable(two_stage.transformer_2)
    finally:
        specdiff.disable(two_stage)
    assert torch.equal(first, again)
    assert not specdiff.is_enabled(two_stage.transformer_2) and not specdiff.is_enabled(two_stage)


def test_per_token_timesteps_and_image_inputs_are_refused(wan):
    transformer = wan.transformer
    config = transformer.config
    latents = torch.randn(1, config.in_channels, 3, 8, 8)
    text = torch.randn(1, 7, config.text_dim)
    specdiff.enable(transformer, specdiff.RASConfig(), num_inference_steps=4)
    try:
        with pytest.raises(NotImplementedError, match="per-token timesteps"):
            transformer(hidden_states=latents, timestep=torch.full((1, 48), 900.0), encoder_hidden_states=text)
        with pytest.raises(NotImplementedError, match="image-to-video"):
            transformer(hidden_states=latents, timestep=torch.tensor([900.0]), encoder_hidden_states=text,
                        encoder_hidden_states_image=torch.randn(1, 4, 16))
        with torch.no_grad():  # a plain text-to-video call of the same model runs
            out = transformer(hidden_states=latents, timestep=torch.tensor([900.0]), encoder_hidden_states=text).sample
        assert out.shape == latents.shape
    finally:
        specdiff.disable(transformer)


def test_a_second_transformer_of_another_family_is_refused_before_any_work(wan):
    from specdiff.lab.tiny_pipelines import tiny_flux_pipeline

    mixed = type(wan)(**{**wan.components, "transformer_2": tiny_flux_pipeline().transformer}, boundary_ratio=0.5)
    with pytest.raises(specdiff.UnsupportedModelError, match="transformer_2 is a FluxTransformer2DModel"):
        specdiff.enable(mixed, specdiff.SpecDiffConfig())
    assert not specdiff.is_enabled(mixed) and not specdiff.is_enabled(wan)


def test_a_two_stage_pipeline_runs_the_graph_path_in_both_stages(two_stage):
    """cuda_graphs="eager" (the graph path's static buffers and kinds of call, no capture on a CPU) on
    both transformers: every generation equals the plain accelerated one."""
    config = specdiff.SpecDiffConfig(cache_ratio=0.75, warmup_steps=1, reset_steps=())
    with specdiff.accelerated(two_stage, config):
        expected = _video(two_stage)
    with specdiff.accelerated(two_stage, config, cuda_graphs="eager"):
        assert two_stage.transformer_2._specdiff_state.adapter.graphs is not None
        for _ in range(2):
            torch.testing.assert_close(_video(two_stage), expected, rtol=1e-5, atol=1e-5)
