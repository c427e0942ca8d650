"""torch.compile with specdiff enabled: regional compilation traces the blocks without graph breaks
and gives the output of the uncompiled run (dynamo's eager backend: the traced graph, no codegen)."""

from __future__ import annotations

import pytest
import torch

import specdiff


def _generate(pipe):
    return pipe("a red fox", num_inference_steps=6, height=64, width=64, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


@pytest.fixture()
def sd3():
    from specdiff.lab.tiny_pipelines import tiny_sd3_pipeline

    torch._dynamo.reset()
    pipe = tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    torch._dynamo.reset()


def _compiled_run(pipe, config):
    import torch._dynamo.utils as dynamo_utils

    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    with specdiff.accelerated(pipe, config):
        plain = _generate(pipe)
        assert specdiff.compile_blocks(pipe, backend=backend) == len(pipe.transformer.transformer_blocks)
        dynamo_utils.counters.clear()
        compiled = _generate(pipe)
        breaks = sum(dynamo_utils.counters["graph_break"].values())
        summary = specdiff.summary(pipe)
    return plain, compiled, breaks, graphs, summary


@pytest.mark.parametrize("config", [
    specdiff.SpecDiffConfig(warmup_steps=2, reset_steps=(), speculative_steps=1),
    specdiff.RASConfig(cache_ratio=0.5, warmup_steps=2, reset_steps=()),
])
def test_token_level_methods_compile_without_graph_breaks_and_match_eager(sd3, config):
    plain, compiled, breaks, graphs, summary = _compiled_run(sd3, config)
    assert breaks == 0
    assert graphs, "nothing was compiled"
    assert any(r.kind == "sparse" for r in summary.records)  # sparse steps ran compiled too
    # tolerance: the eager backend runs the traced ops; only fusion-free reordering may differ
    torch.testing.assert_close(compiled, plain, rtol=1e-5, atol=1e-5)
    assert torch.compiler.is_compiling() is False


def test_block_level_method_compiles_its_blocks_and_matches_eager(sd3):
    plain, compiled, _, graphs, summary = _compiled_run(sd3, specdiff.FORAConfig(interval=2))
    assert graphs
    assert any(r.blocks_computed == 0 for r in summary.records if r.phase == "real")  # cached steps happened
    torch.testing.assert_close(compiled, plain, rtol=1e-5, atol=1e-5)


def test_block_level_policy_decision_is_not_traced_so_blocks_share_their_graphs():
    """More blocks than dynamo's recompile limit: the per-step decision (which blocks run) stays eager and
    every block runs one shared compiled forward, instead of recompiling per block and falling back."""
    from specdiff.lab.tiny_pipelines import tiny_sd3_pipeline

    torch._dynamo.reset()
    pipe = tiny_sd3_pipeline(layers=18)
    pipe.set_progress_bar_config(disable=True)
    try:
        plain, compiled, _, graphs, summary = _compiled_run(pipe, specdiff.FORAConfig(interval=2))
        compiled_graphs = len(graphs)
        with specdiff.accelerated(pipe, specdiff.FORAConfig(interval=2)):  # a later enable reuses them
            again = _generate(pipe)
    finally:
        torch._dynamo.reset()
    assert any(r.blocks_computed == 0 for r in summary.records if r.phase == "real")
    # one graph per block variant (the last block has no text output), not one per block and step
    assert 1 <= compiled_graphs <= 3, compiled_graphs
    assert len(graphs) == compiled_graphs, "a second enable compiled the blocks again"
    torch.testing.assert_close(again, compiled, rtol=0, atol=0)
    torch.testing.assert_close(compiled, plain, rtol=1e-5, atol=1e-5)


def test_attention_context_fields_are_instance_values_not_class_attributes():
    """dynamo before torch 2.13 reads a threading.local's class attributes instead of its values: with
    dataclass defaults, compiled blocks saw `enabled=False` and ran sparse steps without the key/value
    cache (silently wrong images on torch 2.11). Every field must live on the instance only."""
    from specdiff.engine.attention import AttentionContext

    fields = vars(AttentionContext())
    assert fields, "no per-instance fields"
    shadowed = sorted(name for name in fields if name in vars(AttentionContext))
    assert not shadowed, f"class attributes shadow thread-local fields: {shadowed}"


# FLUX: two block kinds and RoPE rows (where variants once grew per step); SD3's blocks are compiled by the
# other tests here. One family keeps the suite within its time (this test alone takes 40 s).
@pytest.mark.parametrize("family", ["flux"])
def test_every_method_in_one_process_stays_within_the_recompile_limit(family):
    """Every method one after another on one compiled pipeline, as benchmarks/gpu_speed.py runs them. A
    block class's code object has one recompile limit for all of them; past it dynamo silently runs the
    block eager (on an H100 this made compiled FORA slower than eager). The variants must not grow with
    the steps: FLUX picked its RoPE rows inside the block, keyed by tensor ids, and recompiled every step."""
    from specdiff.policies.registry import POLICIES, config_for
    from specdiff.lab.tiny_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline

    LIBRARY_METHODS = [name for name, (config_type, _) in POLICIES.items()
                       if config_type.__module__.startswith("specdiff.policies")]
    torch._dynamo.reset()
    pipe = tiny_sd3_pipeline(layers=3) if family == "sd3" else tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    def generate(steps=5):
        return pipe("a red fox", num_inference_steps=steps, height=64, width=64, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    config = specdiff.SpecDiffConfig(warmup_steps=2, reset_steps=(), speculative_steps=1)
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # a hit fails the test
            with specdiff.accelerated(pipe, config):
                plain = generate()
            specdiff.compile_blocks(pipe, backend=backend)
            generate()
            for method in LIBRARY_METHODS:  # the lab's study method compiles SpecDiff's variants again
                with specdiff.accelerated(pipe, config_for(method)):
                    generate()
            with specdiff.accelerated(pipe, config):
                compiled = generate()
                before = len(graphs)
                generate(steps=10)  # twice the steps, other token sets: nothing new to compile
    finally:
        torch._dynamo.reset()
    assert len(graphs) == before, f"{len(graphs) - before} graphs compiled for more steps of a known method"
    torch.testing.assert_close(compiled, plain, rtol=1e-5, atol=1e-5)
