"""Qwen-Image: what its adapter refuses, and that its pieces stay its own (the generic tests run every
method on the tiny Qwen-Image pipeline too: test_policies.py, test_graphs.py, test_engine.py)."""

from __future__ import annotations

import pytest
import torch

import specdiff
from specdiff.adapters.qwenimage import image_rows, rotate


def test_rows_of_the_active_tokens_rotate_as_the_full_sequence():
    """Rotating the active tokens with their picked rows equals rotating every token and picking them."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 2, 8)  # (B, S, H, D)
    freqs = torch.polar(torch.ones(6, 4), torch.randn(6, 4))
    active = torch.tensor([[0, 3], [5, 1]])
    picked, text = image_rows((freqs, "text"), active)
    assert text == "text" and picked.shape == (2, 2, 4)
    full = rotate(x, freqs)
    subset = torch.stack([x[b, active[b]] for b in range(2)])
    expected = torch.stack([full[b, active[b]] for b in range(2)])
    torch.testing.assert_close(rotate(subset, picked), expected)


def test_the_edit_models_and_reference_images_are_refused(qwenimage):
    from diffusers import QwenImageTransformer2DModel

    edit = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                       axes_dims_rope=(4, 6, 6), zero_cond_t=True)
    with pytest.raises(specdiff.UnsupportedModelError, match="zero_cond_t"):
        specdiff.enable(edit, specdiff.RASConfig(), num_inference_steps=4)
    transformer = qwenimage.transformer
    specdiff.enable(transformer, specdiff.RASConfig(), num_inference_steps=4)
    try:
        arguments = dict(hidden_states=torch.randn(1, 8, 16), encoder_hidden_states=torch.randn(1, 5, 16),
                         encoder_hidden_states_mask=torch.ones(1, 5, dtype=torch.long), timestep=torch.tensor([1.0]),
                         img_shapes=[[(1, 2, 4), (1, 2, 4)]])
        with pytest.raises(NotImplementedError, match="several images per sample"):
            transformer(**arguments)
    finally:
        specdiff.disable(transformer)


def test_disable_restores_the_qwenimage_pipeline_exactly(qwenimage):
    call = dict(prompt="a red cat", negative_prompt="blurry", true_cfg_scale=3.0, num_inference_steps=5,
                height=64, width=64, output_type="latent")
    before = qwenimage(**call, generator=torch.Generator().manual_seed(0)).images
    with specdiff.accelerated(qwenimage, specdiff.SpecDiffConfig(warmup_steps=2)):
        accelerated = qwenimage(**call, generator=torch.Generator().manual_seed(0)).images
    after = qwenimage(**call, generator=torch.Generator().manual_seed(0)).images
    assert not torch.equal(accelerated, before) and torch.equal(after, before)
