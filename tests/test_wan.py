"""Wan: what its adapter refuses, and its RoPE rows (the generic tests run every method on the tiny Wan
text-to-video pipeline too: test_policies.py, test_graphs.py, test_engine.py with 9 frames)."""

from __future__ import annotations

import copy

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


def test_a_second_transformer_is_refused_before_any_work(wan):
    """Wan 2.2 A14B's pipeline switches to transformer_2 for the low-noise steps: accelerating only the
    first would leave half the steps plain without a word."""
    two_stage = type(wan)(**{**wan.components, "transformer_2": copy.deepcopy(wan.transformer)}, boundary_ratio=0.5)
    with pytest.raises(specdiff.UnsupportedModelError, match="transformer_2"):
        specdiff.enable(two_stage, specdiff.SpecDiffConfig())
    assert not specdiff.is_enabled(two_stage)


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
