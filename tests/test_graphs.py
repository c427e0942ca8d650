"""The CUDA-graph path on a CPU: the same static buffers and kinds of step as on a GPU, with captures
emulated (tests/emulated_graphs.py: recorded operators replayed on the same tensors, no Python of the
step). It must give the plain path's outputs, keep its buffers' addresses across generations, capture
again when shapes or weights change, never sync the host inside a step, and refuse what it cannot replay."""

from __future__ import annotations

import pytest
import torch

import specdiff
from conftest import outputs as pipeline_outputs
from emulated_graphs import SyncCounter, emulate_graphs
from specdiff.integration import _state_of

STEPS = 6
TOKEN_LEVEL = {
    "specdiff": specdiff.SpecDiffConfig(warmup_steps=2, reset_steps=(5,)),
    "ras": specdiff.RASConfig(warmup_steps=2, cache_ratio=0.7),
    "random": specdiff.RandomTokensConfig(warmup_steps=2),
    "full": specdiff.FullComputeConfig(),
}


@pytest.fixture(scope="module", params=["sd3", "flux", "flux2", "qwenimage", "wan"])
def pipe(request):
    pipe = request.getfixturevalue(request.param)  # conftest.py's tiny stock pipelines
    pipe.family = request.param
    return pipe


def _call(pipe, height=64, width=48, **extra):
    arguments = dict(prompt="a red fox in the snow", num_inference_steps=STEPS, height=height, width=width,
                     output_type="latent", generator=torch.Generator().manual_seed(0), **extra)
    if pipe.family == "sd3":
        arguments["guidance_scale"] = 4.0  # a CFG batch
    if pipe.family == "qwenimage":
        arguments.update(negative_prompt="blurry", true_cfg_scale=3.0)  # CFG as a second call per step
    if pipe.family == "flux2":  # the tiny text encoder has one layer; CFG as a second call per step
        arguments.update(text_encoder_out_layers=(1, 1, 1), max_sequence_length=16, guidance_scale=3.0)
    if pipe.family == "wan":
        arguments.update(negative_prompt="blurry", guidance_scale=3.0, num_frames=9, max_sequence_length=16)
    return pipeline_outputs(pipe(**arguments))


def _plain(pipe, config, **call):
    with specdiff.accelerated(pipe, config):
        return _call(pipe, **call)


@pytest.mark.parametrize("method", sorted(TOKEN_LEVEL))
def test_replayed_steps_equal_the_plain_path_across_generations(pipe, method):
    config = TOKEN_LEVEL[method]
    expected = _plain(pipe, config)
    specdiff.enable(pipe, config, cuda_graphs="eager")
    try:
        graphs = emulate_graphs(pipe)
        runtime = _state_of(pipe).runtime
        outputs, addresses = [], []
        for _ in range(3):  # a kind met once per generation is captured in the second, replayed in the third
            outputs.append(_call(pipe))
            addresses.append(runtime.buffer_addresses())
        assert graphs.replays >= STEPS  # the later generations run from graphs
        branches = 2 if pipe.family in ("flux2", "qwenimage", "wan") else 1  # CFG as a second call per step: its own kinds
        assert graphs.captures == len(graphs.variants) <= 8 * branches  # a few kinds of step, each captured once
        assert addresses[0] == addresses[1] == addresses[2]  # buffers reused: same data pointers
        for output in outputs:
            assert torch.allclose(output, expected, atol=1e-5, rtol=0)
    finally:
        specdiff.disable(pipe)


def test_a_shape_change_captures_again_and_stays_exact(pipe):
    config = TOKEN_LEVEL["specdiff"]
    expected = {shape: _plain(pipe, config, height=shape[0], width=shape[1]) for shape in ((64, 48), (48, 64))}
    specdiff.enable(pipe, config, cuda_graphs="eager")
    try:
        graphs = emulate_graphs(pipe)
        captures = []
        for shape in ((64, 48), (64, 48), (48, 64), (48, 64), (64, 48)):
            output = _call(pipe, height=shape[0], width=shape[1])
            assert torch.allclose(output, expected[shape], atol=1e-5, rtol=0), shape
            captures.append(graphs.captures)
        assert captures[3] > captures[1]  # the new shape was captured (not run on the old shape's graphs)
    finally:
        specdiff.disable(pipe)


def test_changed_weights_drop_the_graphs(pipe):
    config = TOKEN_LEVEL["ras"]
    specdiff.enable(pipe, config, cuda_graphs="eager")
    try:
        graphs = emulate_graphs(pipe)
        _call(pipe)
        _call(pipe)
        assert graphs.variants
        weight = pipe.transformer.proj_out.weight
        original = weight.data
        weight.data = original.clone() * 1.5  # new storage: a graph would read the old address
        try:
            output = _call(pipe)
            calls = STEPS * (2 if pipe.family in ("flux2", "qwenimage", "wan") else 1)  # CFG as two calls per step
            assert sum(v.calls for v in graphs.variants.values()) == calls  # only this generation's: dropped at its start
            specdiff.disable(pipe)
            assert torch.allclose(output, _plain(pipe, config), atol=1e-5, rtol=0)
        finally:
            weight.data = original
    finally:
        if specdiff.is_enabled(pipe):
            specdiff.disable(pipe)


@pytest.mark.parametrize("method", ["specdiff", "ras"])
def test_no_host_sync_inside_a_dense_or_sparse_call(pipe, method):
    """The engine's part of every transformer call issues no operator that reads a device value on the
    host, on the plain path too (counted per call; the graph path would fail its capture)."""
    config = TOKEN_LEVEL[method]
    with specdiff.accelerated(pipe, config):
        _call(pipe)  # the schedule reader's one read per pipeline pass happens on its first call
        counts, kinds = [], []
        specdiff.observe(pipe, lambda e: kinds.append("dense" if e.plan.compute is None else "sparse"))
        counter = SyncCounter()
        transformer = pipe.transformer

        def start(*args):
            counter.syncs = []
            counter.__enter__()

        def stop(*args):
            counter.__exit__(None, None, None)
            counts.append(counter.syncs)

        hooks = [transformer.register_forward_pre_hook(start), transformer.register_forward_hook(stop)]
        try:
            _call(pipe)
        finally:
            for hook in hooks:
                hook.remove()
    real_calls = counts[-len(kinds):]
    assert "sparse" in kinds and "dense" in kinds
    assert all(not syncs for syncs in real_calls), real_calls


def test_graphs_refuse_what_they_cannot_replay(pipe):
    with pytest.raises(ValueError, match="cuda_graphs"):
        specdiff.enable(pipe, specdiff.FORAConfig(), cuda_graphs=True)
    with pytest.raises(ValueError, match="needs the transformer on a CUDA device"):
        specdiff.enable(pipe, specdiff.SpecDiffConfig(), cuda_graphs=True)
    with pytest.raises(ValueError, match="must be False, True or 'eager'"):
        specdiff.enable(pipe, specdiff.SpecDiffConfig(), cuda_graphs="yes")
    assert not specdiff.is_enabled(pipe)
    specdiff.enable(pipe, specdiff.SpecDiffConfig(), cuda_graphs="eager")
    try:
        emulate_graphs(pipe)
        with pytest.raises(RuntimeError, match="observe cannot see steps replayed"):
            specdiff.observe(pipe, print)
    finally:
        specdiff.disable(pipe)


def test_offloading_is_refused_in_one_line(pipe):
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    transformer = pipe.transformer
    add_hook_to_module(transformer, ModelHook())  # what enable_model_cpu_offload puts on the model
    try:
        with pytest.raises(ValueError, match="weights move per call"):
            specdiff.enable(pipe, specdiff.SpecDiffConfig(), cuda_graphs="eager")
    finally:
        remove_hook_from_module(transformer)
    specdiff.enable(pipe, specdiff.RASConfig(), cuda_graphs="eager")
    try:
        add_hook_to_module(transformer, ModelHook())  # offloading added after enable: refused at the next call
        with pytest.raises(RuntimeError, match="weights move per call") as error:
            _call(pipe)
        assert "\n" not in str(error.value)
        remove_hook_from_module(transformer)
        _call(pipe)  # and the pipeline works again once it is gone
    finally:
        remove_hook_from_module(transformer)
        specdiff.disable(pipe)


def test_disable_frees_the_graphs_and_restores_the_model(pipe):
    stock = _call(pipe)
    specdiff.enable(pipe, TOKEN_LEVEL["specdiff"], cuda_graphs="eager")
    state = _state_of(pipe)
    graphs = emulate_graphs(pipe)
    _call(pipe)
    _call(pipe)
    assert graphs.variants and len(state.runtime.buffers)
    specdiff.disable(pipe)
    assert not graphs.variants and not len(state.runtime.buffers)
    assert all(slot.keys is None for slots in state.runtime.kv_slots for slot in slots)
    assert "specdiff_step_graphs" not in getattr(pipe.transformer, "_diffusers_hook").hooks
    assert torch.equal(_call(pipe), stock)


def test_graphs_refuse_a_call_that_autograd_records(sd3):
    transformer = sd3.transformer
    config = transformer.config
    specdiff.enable(transformer, specdiff.RASConfig(), num_inference_steps=4, cuda_graphs="eager")
    try:
        arguments = dict(hidden_states=torch.randn(1, config.in_channels, 8, 8),
                         encoder_hidden_states=torch.randn(1, 12, config.joint_attention_dim),
                         pooled_projections=torch.randn(1, config.pooled_projection_dim), timestep=torch.tensor([1000.0]))
        with torch.enable_grad(), pytest.raises(RuntimeError, match="replays inference calls"):
            transformer(**arguments)
        with torch.no_grad():
            transformer(**arguments)  # the same call under no_grad runs
    finally:
        specdiff.disable(transformer)
