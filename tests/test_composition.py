"""specdiff next to what users already run: offload hooks, diffusers hooks, LoRA, attention backends,
and each family's own guidance layout."""

from __future__ import annotations

import pytest
import torch

import specdiff
from specdiff.lab.tiny_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline

STEPS = 5
EXACT = specdiff.SpecDiffConfig(cache_ratio=0.0, warmup_steps=1, speculative_steps=0)
FAST = specdiff.SpecDiffConfig(cache_ratio=0.75, warmup_steps=2, reset_steps=(), speculative_steps=1)
FAMILIES = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}


def run(pipe, seed=0, **extra):
    args = dict(prompt="a red cat", num_inference_steps=STEPS, height=64, width=64, output_type="pt",
                generator=torch.Generator().manual_seed(seed))
    args.update(extra)
    return pipe(**args).images


def build(family):
    pipe = FAMILIES[family]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _offload(pipe, kind):
    if kind == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    elif kind == "sequential":
        # what enable_sequential_cpu_offload does to each model (here its text encoders fail in accelerate's
        # parameter copy on CPU, with or without specdiff: only the transformer is offloaded)
        from accelerate import cpu_offload

        cpu_offload(pipe.transformer, execution_device="cpu")
    else:
        from accelerate import cpu_offload_with_hook

        pipe._hook = cpu_offload_with_hook(pipe.transformer, execution_device="cpu")[1]


def _remove_offload(pipe, kind):
    if kind == "hook":
        pipe._hook.remove()
    elif kind == "sequential":
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(pipe.transformer, recurse=True)
    else:
        pipe.remove_all_hooks()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kind", ["model", "sequential", "hook"])
@pytest.mark.parametrize("order", ["offload-first", "specdiff-first"])
def test_offload_hooks_and_specdiff_compose_in_either_order(family, kind, order):
    pipe = build(family)
    plain = run(pipe)
    fast_reference = None
    specdiff.enable(pipe, FAST)
    try:
        fast_reference = run(pipe)
    finally:
        specdiff.disable(pipe)
    if order == "offload-first":
        _offload(pipe, kind)
        specdiff.enable(pipe, FAST)
    else:
        specdiff.enable(pipe, FAST)
        _offload(pipe, kind)
    torch.testing.assert_close(run(pipe), fast_reference, rtol=1e-5, atol=1e-5)
    specdiff.disable(pipe)
    # specdiff alone is gone: the offloader's hook is still there and the output is the plain one
    hooked = pipe.transformer if kind != "sequential" else pipe.transformer.proj_out
    assert getattr(hooked, "_hf_hook", None) is not None and "forward" in vars(hooked)
    torch.testing.assert_close(run(pipe), plain, rtol=1e-5, atol=1e-5)
    _remove_offload(pipe, kind)
    torch.testing.assert_close(run(pipe), plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_diffusers_hook_keeps_working_beside_specdiff(family):
    """A stateless diffusers ModelHook (here one that scales the transformer's output) composes both ways."""
    from diffusers.hooks import HookRegistry, ModelHook

    class Scale(ModelHook):
        def post_forward(self, module, output):
            (output[0] if isinstance(output, tuple) else output.sample).mul_(0.5)
            return output

    pipe = build(family)
    specdiff.enable(pipe, FAST)
    try:
        fast = run(pipe)
    finally:
        specdiff.disable(pipe)
    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    registry.register_hook(Scale(), "scale")
    scaled_plain = run(pipe)
    specdiff.enable(pipe, FAST)
    scaled_fast = run(pipe)
    registry.remove_hook("scale")
    assert not torch.allclose(scaled_fast, fast)  # the hook ran
    torch.testing.assert_close(run(pipe), fast, rtol=1e-5, atol=1e-5)  # specdiff still on, the hook gone
    registry.register_hook(Scale(), "scale")  # a hook added after enable
    torch.testing.assert_close(run(pipe), scaled_fast, rtol=1e-5, atol=1e-5)
    specdiff.disable(pipe)
    torch.testing.assert_close(run(pipe), scaled_plain, rtol=1e-5, atol=1e-5)


def _add_tiny_lora(transformer, seed=0):
    from peft import LoraConfig

    torch.manual_seed(seed)
    targets = ["to_q", "to_k", "to_v"]
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False),
                            adapter_name="tiny")
    return transformer


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_scale_is_honoured(family):
    pipe = build(family)
    _add_tiny_lora(pipe.transformer)
    outputs = {}
    for scale in (0.0, 0.7, 1.5):
        plain = run(pipe, joint_attention_kwargs={"scale": scale})
        specdiff.enable(pipe, EXACT)
        try:
            accelerated = run(pipe, joint_attention_kwargs={"scale": scale})
        finally:
            specdiff.disable(pipe)
        torch.testing.assert_close(accelerated, plain, rtol=1e-5, atol=1e-5)
        outputs[scale] = plain
    assert not torch.allclose(outputs[0.7], outputs[1.5])  # the scale matters: the check can fail


def test_flux_attention_backend_is_honoured():
    from diffusers.models import attention_dispatch

    pipe = build("flux")
    calls = []
    original = attention_dispatch.dispatch_attention_fn

    def counting(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return original(*args, **kwargs)

    pipe.transformer.set_attention_backend("native")
    specdiff.enable(pipe, FAST)
    try:
        import specdiff.adapters.flux as flux_adapter

        flux_adapter.dispatch_attention_fn = counting
        run(pipe)
        assert calls and all(str(getattr(b, "value", b)) == "native" for b in calls)
        pipe.transformer.set_attention_backend("_native_math")  # chosen while enabled
        calls.clear()
        run(pipe)
        assert calls and all(str(getattr(b, "value", b)) == "_native_math" for b in calls)
    finally:
        flux_adapter.dispatch_attention_fn = original
        specdiff.disable(pipe)
    # the backend chosen while enabled stays chosen after disable
    assert all(str(getattr(p._attention_backend, "value", p._attention_backend)) == "_native_math"
               for p in pipe.transformer.attn_processors.values())
    pipe.transformer.set_attention_backend("native")  # diffusers keeps the active backend globally: restore it


def _selections(pipe, **extra):
    """The computed-token sets of every real sparse step, per batch row."""
    seen = []

    def record(event):
        if event.plan.compute is not None:
            seen.append((event.signals.cfg_groups, event.plan.compute.sort(dim=-1).values.clone()))

    specdiff.observe(pipe, record)
    run(pipe, **extra)
    return seen


@pytest.mark.parametrize("case, extra, groups, rows", [
    ("flux-without-guidance-embeds", dict(prompt=["a red cat", "a blue dog"]), 1, 2),
    ("flux-true-cfg", dict(prompt=["a red cat", "a blue dog"], negative_prompt=["x", "y"], true_cfg_scale=2.0), 1, 2),
    ("flux-guidance-embeds", dict(prompt=["a red cat", "a blue dog"]), 1, 2),
    ("sd3-cfg", dict(prompt=["a red cat", "a blue dog"], guidance_scale=5.0), 2, 4),
    ("sd3-no-cfg", dict(prompt=["a red cat", "a blue dog"], guidance_scale=1.0), 1, 2),
    ("sd3-two-images-per-prompt", dict(prompt="a red cat", guidance_scale=5.0, num_images_per_prompt=2), 2, 4),
])
def test_each_prompt_gets_its_own_selection_unless_rows_are_its_cfg_pair(case, extra, groups, rows):
    if case == "flux-without-guidance-embeds":
        from diffusers import FluxTransformer2DModel

        pipe = build("flux")
        config = dict(pipe.transformer.config)
        config["guidance_embeds"] = False
        pipe.transformer = FluxTransformer2DModel.from_config(config).eval()
    else:
        pipe = build(case.split("-")[0])
    config = specdiff.RASConfig(cache_ratio=0.5, warmup_steps=2)
    specdiff.enable(pipe, config)
    try:
        seen = _selections(pipe, **extra)
    finally:
        specdiff.disable(pipe)
    assert seen and all(g == groups for g, _ in seen)
    for _, compute in seen:
        assert compute.shape[0] == rows
        if groups == 2:  # [uncond, cond] rows of one prompt share their selection
            torch.testing.assert_close(compute[: rows // 2], compute[rows // 2:])
    if case.startswith("flux") or case == "sd3-no-cfg":  # two prompts: two different selections somewhere
        assert any(not torch.equal(c[0], c[1]) for _, c in seen)


def test_what_specdiff_cannot_accelerate_is_refused_only_when_accelerating():
    pipe = build("sd3")
    transformer = pipe.transformer
    args = dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 8, 64),
                pooled_projections=torch.randn(1, 64), timestep=torch.tensor([1000.0]), skip_layers=[0])
    with torch.no_grad():
        plain = transformer(**args).sample
        specdiff.enable(transformer, FAST.__class__(speculative_steps=0), num_inference_steps=4)
        try:
            with pytest.raises(NotImplementedError, match="skip_layers"):
                transformer(**args)
        finally:
            specdiff.disable(transformer)
        torch.testing.assert_close(transformer(**args).sample, plain, rtol=0, atol=0)
    with specdiff.accelerated(pipe, FAST):  # a pipeline outside its call runs the transformer plain
        with torch.no_grad():
            torch.testing.assert_close(transformer(**args).sample, plain, rtol=1e-6, atol=1e-6)
