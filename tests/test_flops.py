"""At cache ratio 0.9 the FLOPs fall to what the schedule predicts, and summary shows C1 / C2 / C3."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

import specdiff
from specdiff.lab.evaluation.flops import _extra_mapping, count_flops
from specdiff.lab.tiny_pipelines import tiny_sd3_pipeline

STEPS = 10
TEXT_TOKENS = 77 + 16  # CLIP + T5 (max_sequence_length=16)


def per_call_flops(pipe, **kwargs) -> list[int]:
    """FLOPs of each transformer call during one generation."""
    counter = FlopCounterMode(display=False, custom_mapping=_extra_mapping())
    marks: list[int] = []
    handle_pre = pipe.transformer.register_forward_pre_hook(lambda *a: marks.append(counter.get_total_flops()))
    handle_post = pipe.transformer.register_forward_hook(lambda *a: marks.append(counter.get_total_flops()))
    try:
        with counter:
            pipe(**kwargs)
    finally:
        handle_pre.remove()
        handle_post.remove()
    return [marks[i + 1] - marks[i] for i in range(0, len(marks), 2)]


def block_flops(image_queries: int, text_queries: int, keys: int, width: int) -> float:
    """Leading terms of an MMDiT block: 24 d^2 per token of linear layers, 4 Q K d of attention."""
    queries = image_queries + text_queries
    return 24 * width * width * queries + 4 * queries * keys * width


def test_flops_follow_the_schedule_and_summary_shows_the_levels():
    width = 128
    pipe = tiny_sd3_pipeline(width=width, layers=2, heads=2)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(
        prompt="a red cat", num_inference_steps=STEPS, height=64, width=64, guidance_scale=5.0,
        max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="latent",
    )
    full = per_call_flops(pipe, **kwargs)
    assert len(full) == STEPS and len(set(full)) == 1
    dense = full[0]

    # speculation with its CFG rows: every dense call, speculative ones too, has the full batch
    config = specdiff.SpecDiffConfig(cache_ratio=0.9, warmup_steps=2, reset_steps=(6,), speculative_cfg=True)
    specdiff.enable(pipe, config)
    try:
        calls = per_call_flops(pipe, **kwargs)
        summary = specdiff.summary(pipe)
    finally:
        specdiff.disable(pipe)

    tokens = 256
    c1 = round(0.1 * tokens)
    records = summary.records
    assert [r.kind for r in records] == ["dense"] * 2 + ["dense", "dense"] + ["sparse"] * 4 + ["dense"] + ["sparse"] * 3
    assert len(calls) == len(records) == config.speculative_steps + STEPS
    for record, flops in zip(records, calls):
        if record.kind == "dense":
            # taps add a few sampled queries per layer: well under 5% of a forward
            assert dense <= flops < 1.05 * dense
        else:
            assert record.computed == c1
            assert record.computed + record.reused + record.approximated == tokens
            predicted = block_flops(c1, TEXT_TOKENS, tokens + TEXT_TOKENS, width)
            full_block = block_flops(tokens, TEXT_TOKENS, tokens + TEXT_TOKENS, width)
            ratio = flops / dense
            assert abs(ratio - predicted / full_block) < 0.05, (ratio, predicted / full_block)
    # With three outputs of history, both C2 (reuse) and C3 (approximation) are in use.
    late = [r for r in records if r.kind == "sparse" and r.step >= 5]
    assert all(r.reused > 0 and r.approximated > 0 for r in late)

    total_ratio = sum(calls) / sum(full)
    n_dense = sum(r.kind == "dense" for r in records)
    sparse_ratio = block_flops(c1, TEXT_TOKENS, tokens + TEXT_TOKENS, width) / block_flops(
        tokens, TEXT_TOKENS, tokens + TEXT_TOKENS, width
    )
    predicted_total = (n_dense + (len(records) - n_dense) * sparse_ratio) / STEPS
    assert abs(total_ratio - predicted_total) < 0.05, (total_ratio, predicted_total)
    assert total_ratio < 0.75


def test_cpu_attention_flops_are_counted():
    q = torch.randn(1, 2, 64, 32)
    flops = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert flops >= 4 * 64 * 64 * 32 * 2  # QK^T and AV for 2 heads
