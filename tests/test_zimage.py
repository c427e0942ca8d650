"""Z-Image: its sequence handling (image rows gathered before the main layers, filled after the final
layer), CFG rows [conditional, unconditional], what its adapter refuses (the generic tests run every
method on the tiny Z-Image pipeline too: test_policies.py)."""

from __future__ import annotations

import pytest
import torch

import specdiff
from specdiff.adapters.zimage import gather_image_rows, rotate
from specdiff.engine.attention import AttentionContext, tap_attention

CALL = dict(num_inference_steps=6, height=64, width=96, output_type="latent", max_sequence_length=32,
            guidance_scale=4.0)  # a CFG batch: [conditional, unconditional] rows


def _run(pipe, **extra):
    # a new prompt list per call: ZImagePipeline writes the chat template into the list it is given
    return pipe(prompt=["a red cat", "two dogs on a long red sofa"], generator=torch.Generator().manual_seed(0),
                **{**CALL, **extra}).images


def test_gathered_rows_rotate_as_the_full_sequence():
    torch.manual_seed(0)
    image, caption = 4, 3
    x = torch.randn(2, image + caption, 2, 8)
    freqs = torch.polar(torch.ones(2, image + caption, 4), torch.randn(2, image + caption, 4))
    active = torch.tensor([[3, 0], [1, 2]])
    rows = [torch.cat([active[b], torch.arange(image, image + caption)]) for b in range(2)]
    full = rotate(x, freqs)
    picked_x = gather_image_rows(x.flatten(2), image, active).unflatten(2, (2, 8))  # rows of the (B, S, D) sequence
    picked = rotate(picked_x, gather_image_rows(freqs, image, active))
    torch.testing.assert_close(picked, torch.stack([full[b, rows[b]] for b in range(2)]))


def test_every_token_computed_matches_plain_diffusers_with_a_cfg_batch(zimage):
    """Two prompts of different lengths (a key mask), CFG rows, non-square."""
    plain = _run(zimage)
    for config in (specdiff.SpecDiffConfig(cache_ratio=0.0, warmup_steps=1), specdiff.RASConfig(cache_ratio=0.0),
                   specdiff.ToCaConfig(interval=1), specdiff.FORAConfig(interval=1)):
        with specdiff.accelerated(zimage, config):
            out = _run(zimage)
        torch.testing.assert_close(torch.stack(list(out)), torch.stack(list(plain)), rtol=1e-5, atol=1e-5)


def test_sparse_steps_run_fewer_tokens_and_disable_restores_exactly(zimage):
    plain = _run(zimage)
    config = specdiff.SpecDiffConfig(cache_ratio=0.75, warmup_steps=2, reset_steps=())
    with specdiff.accelerated(zimage, config) as summary:
        fast = _run(zimage)
        sparse = [r for r in summary().records if r.phase == "real" and r.kind == "sparse"]
    # 64 x 96 px: 32 x 48 latents, 16 x 24 patches = 384 image tokens (a multiple of 32: no padding)
    assert sparse and all(r.tokens == 384 and r.computed == 96 for r in sparse)
    assert not torch.equal(torch.stack(list(fast)), torch.stack(list(plain)))
    assert torch.equal(torch.stack(list(_run(zimage))), torch.stack(list(plain)))


def test_taps_of_a_cfg_batch_read_the_conditional_rows_where_a_family_puts_them():
    torch.manual_seed(0)
    queries, keys = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 6, 8)
    sums = {}
    for first in (False, True):
        ctx = AttentionContext()
        ctx.tap_queries, ctx.tap_sum, ctx.conditional_first = 4, torch.zeros(1, 6), first
        tap_attention(ctx, torch.tensor(0), queries, None, keys, slice(0, 6))
        sums[first] = ctx.tap_sum
    for first, row in ((False, 1), (True, 0)):  # the same as the taps of that row alone
        ctx = AttentionContext()
        ctx.tap_queries, ctx.tap_sum = 4, torch.zeros(1, 6)
        tap_attention(ctx, torch.tensor(0), queries[row : row + 1], None, keys[row : row + 1], slice(0, 6))
        torch.testing.assert_close(sums[first], ctx.tap_sum)
    assert not torch.allclose(sums[False], sums[True])


def test_what_the_engine_cannot_honour_is_refused_in_one_line(zimage):
    with specdiff.accelerated(zimage, specdiff.RASConfig()):
        with pytest.raises(NotImplementedError, match="cfg_truncation=0.5"):
            _run(zimage, cfg_truncation=0.5)
    with pytest.raises(ValueError, match="cannot replay ZImageTransformer2DModel.*cuda_graphs=False"):
        specdiff.enable(zimage, specdiff.RASConfig(), cuda_graphs="eager")
    assert not specdiff.is_enabled(zimage)
    transformer = zimage.transformer
    specdiff.enable(transformer, specdiff.RASConfig(), num_inference_steps=4)
    try:
        latents = [torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 16)]
        with pytest.raises(NotImplementedError, match="samples of different sizes"):
            transformer(latents, torch.tensor([0.5, 0.5]), [torch.randn(5, 16), torch.randn(5, 16)])
    finally:
        specdiff.disable(transformer)
