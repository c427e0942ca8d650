"""FLUX.2 ([klein], one transformer class with [dev]): its position rows, what its adapter refuses, and
exactness with classifier-free guidance as a second call (the generic tests run every method on the tiny
FLUX.2 pipeline too: test_policies.py, test_graphs.py)."""

from __future__ import annotations

import pytest
import torch

import specdiff
from specdiff.adapters.flux import apply_rope, rope_rows

CALL = dict(num_inference_steps=6, height=64, width=96, output_type="latent", text_encoder_out_layers=(1, 1, 1),
            max_sequence_length=16, guidance_scale=4.0)  # guidance 4 on [klein]: an unconditional call per step


def _run(pipe, **extra):
    return pipe(prompt=["a red cat", "two dogs on a sofa"], generator=torch.Generator().manual_seed(0),
                **{**CALL, **extra}).images


def test_picked_rows_of_the_joined_positions_rotate_as_the_full_sequence():
    """[text, image] rows picked for the active image tokens rotate them as the whole sequence would."""
    torch.manual_seed(0)
    text_len, tokens = 3, 6
    x = torch.randn(2, text_len + tokens, 2, 8)
    cos, sin = torch.randn(text_len + tokens, 8), torch.randn(text_len + tokens, 8)
    active = torch.tensor([[4, 0], [2, 5]])
    picked = rope_rows((cos, sin), text_len, active)
    full = apply_rope(x, cos, sin)
    rows = [torch.cat([torch.arange(text_len), text_len + active[b]]) for b in range(2)]
    subset = torch.stack([x[b, rows[b]] for b in range(2)])
    torch.testing.assert_close(apply_rope(subset, *picked), torch.stack([full[b, rows[b]] for b in range(2)]))


def test_every_token_computed_matches_plain_diffusers_with_cfg_calls(flux2):
    plain = _run(flux2)
    for config in (specdiff.SpecDiffConfig(cache_ratio=0.0, warmup_steps=1), specdiff.RASConfig(cache_ratio=0.0),
                   specdiff.ToCaConfig(interval=1), specdiff.FORAConfig(interval=1)):
        with specdiff.accelerated(flux2, config) as summary:
            out = _run(flux2)
            records = summary().records
        torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
        assert {r.branch for r in records if r.phase == "real"} == {0, 1}  # the unconditional call: its own branch


def test_sparse_steps_run_fewer_tokens_and_disable_restores_exactly(flux2):
    plain = _run(flux2)
    processors = dict(flux2.transformer.attn_processors)
    with specdiff.accelerated(flux2, specdiff.SpecDiffConfig(cache_ratio=0.75, warmup_steps=2, reset_steps=())) as summary:
        fast = _run(flux2)
        sparse = [r for r in summary().records if r.phase == "real" and r.kind == "sparse"]
    assert sparse and all(r.tokens == 16 * 24 and r.computed == 16 * 24 // 4 for r in sparse)  # 64 x 96 px: 16 x 24
    assert not torch.equal(fast, plain)
    assert torch.equal(_run(flux2), plain)
    assert all(flux2.transformer.attn_processors[k] is v for k, v in processors.items())


def test_reference_images_and_the_kv_cache_are_refused_in_one_line(flux2):
    with specdiff.accelerated(flux2, specdiff.RASConfig()):
        with pytest.raises(NotImplementedError, match="reference images .*\\(image=\\)"):
            flux2(prompt="x", image=[torch.zeros(3, 64, 64)], **CALL)
    transformer = flux2.transformer
    specdiff.enable(transformer, specdiff.RASConfig(), num_inference_steps=4)
    try:
        arguments = dict(hidden_states=torch.randn(1, 8, 16), encoder_hidden_states=torch.randn(1, 5, 48),
                         timestep=torch.tensor([1.0]), img_ids=torch.zeros(8, 4), txt_ids=torch.zeros(5, 4),
                         kv_cache_mode="extract", num_ref_tokens=2)
        with pytest.raises(NotImplementedError, match="key/value cache"):
            transformer(**arguments)
    finally:
        specdiff.disable(transformer)
