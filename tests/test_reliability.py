"""Nothing silently wrong: threads, randomness, invalid values, weights files, replaced parts, pickling."""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import pickle
import shutil
import threading
import typing

import pytest
import torch

import specdiff
from specdiff.policies.registry import POLICIES
from specdiff.lab.tiny_pipelines import tiny_sd3_pipeline

STEPS = 6
FAST = specdiff.SpecDiffConfig(cache_ratio=0.75, warmup_steps=2, reset_steps=(), speculative_steps=2)


def run(pipe, seed=0, **extra):
    args = dict(prompt="a red cat", num_inference_steps=STEPS, height=64, width=64, output_type="pt",
                generator=torch.Generator().manual_seed(seed))
    args.update(extra)
    return pipe(**args).images


@pytest.fixture()
def sd3():
    pipe = tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sharing(pipe):
    """A second stock pipeline object that shares `pipe`'s transformer and encoders (its own scheduler:
    diffusers' schedulers hold per-generation state)."""
    other = type(pipe)(**{**pipe.components, "scheduler": copy.deepcopy(pipe.scheduler)})
    other.set_progress_bar_config(disable=True)
    return other


# -- threads -------------------------------------------------------------------

class PausedGeneration:
    """Runs `pipe` in a thread and holds it at step `at_step` (its caches live) until `finish()`."""

    def __init__(self, pipe, at_step: int) -> None:
        self.paused, self.resume, self.result = threading.Event(), threading.Event(), {}

        def pause(pipe, step, timestep, kwargs):
            if step == at_step and not self.paused.is_set():
                self.paused.set()
                assert self.resume.wait(60)
            return kwargs

        self.thread = threading.Thread(target=lambda: self.result.setdefault(
            "images", run(pipe, callback_on_step_end=pause)))
        self.thread.start()
        assert self.paused.wait(60)

    def finish(self):
        self.resume.set()
        self.thread.join(60)
        return self.result["images"]


def _in_thread(call):
    outcome = {}

    def target():
        try:
            outcome["value"] = call()
        except RuntimeError as error:
            outcome["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(60)
    return outcome


def test_a_plain_pipeline_sharing_the_transformer_runs_plain_from_another_thread(sd3):
    plain_pipe = _sharing(sd3)
    expected_plain = run(plain_pipe)
    specdiff.enable(sd3, FAST)
    try:
        expected_fast = run(sd3)
        accelerated = PausedGeneration(sd3, at_step=2)
        plain = _in_thread(lambda: run(plain_pipe))  # runs while the accelerated generation is mid-way
        fast = accelerated.finish()
    finally:
        specdiff.disable(sd3)
    torch.testing.assert_close(plain["value"], expected_plain, rtol=0, atol=0)
    torch.testing.assert_close(fast, expected_fast, rtol=0, atol=0)


def test_one_enabled_pipeline_used_from_two_threads_at_once_is_refused(sd3):
    specdiff.enable(sd3, FAST)
    try:
        first = PausedGeneration(sd3, at_step=1)
        second = _in_thread(lambda: run(sd3))
        images = first.finish()
        assert "another thread" in str(second.get("error"))
        assert images.shape == (1, 3, 64, 64)
        torch.testing.assert_close(run(sd3), images, rtol=0, atol=0)  # usable again afterwards
    finally:
        specdiff.disable(sd3)


@pytest.mark.parametrize("config", [FAST, specdiff.FORAConfig()], ids=["specdiff", "fora"])
def test_disable_or_enable_while_a_generation_runs_is_refused_and_the_image_is_untouched(sd3, config):
    """disable / enable from another thread while a generation is paused mid-way: refused in one line
    naming the running generation; the generation finishes as if nothing had been tried."""
    specdiff.enable(sd3, config)
    try:
        expected = run(sd3)
        paused = PausedGeneration(sd3, at_step=3)
        tried = [_in_thread(lambda: specdiff.disable(sd3)), _in_thread(lambda: specdiff.enable(sd3, FAST))]
        images = paused.finish()
        for outcome in tried:
            message = str(outcome.get("error"))
            assert "refused" in message and f"a {config.method} generation" in message and "\n" not in message
        assert specdiff.is_enabled(sd3)
        torch.testing.assert_close(images, expected, rtol=0, atol=0)
    finally:
        specdiff.disable(sd3)
    assert not specdiff.is_enabled(sd3)


def test_disable_from_an_observer_is_refused_and_the_generation_goes_on(sd3):
    specdiff.enable(sd3, FAST)
    errors = []

    def observer(event):
        if event.step == 3:
            try:
                specdiff.disable(sd3)
            except RuntimeError as error:
                errors.append(str(error))

    try:
        expected = run(sd3)
        specdiff.observe(sd3, observer)
        torch.testing.assert_close(run(sd3), expected, rtol=0, atol=0)
    finally:
        specdiff.disable(sd3)
    assert len(errors) == 1 and "refused" in errors[0] and "this thread" in errors[0]


def test_a_bare_transformer_can_be_disabled_between_the_calls_of_its_loop(sd3):
    transformer = sd3.transformer
    specdiff.enable(transformer, specdiff.RASConfig(), num_inference_steps=4)
    config = transformer.config
    latents = torch.randn(1, config.in_channels, 8, 8)
    text, pooled = torch.randn(1, 12, config.joint_attention_dim), torch.randn(1, config.pooled_projection_dim)
    transformer(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled,
                timestep=torch.tensor([1000.0]))
    specdiff.disable(transformer)  # between calls: nothing runs
    assert not specdiff.is_enabled(transformer)


def test_accelerated_keeps_the_blocks_own_error_after_a_disable_inside_it(sd3):
    with pytest.raises(ValueError, match="the user's own"):
        with specdiff.accelerated(sd3, FAST):
            specdiff.disable(sd3)
            raise ValueError("the user's own error")
    assert not specdiff.is_enabled(sd3)


def test_a_pipeline_call_from_inside_its_own_generation_is_named_as_such(sd3):
    specdiff.enable(sd3, FAST)
    seen = []

    def nested(pipe, step, timestep, kwargs):
        if step == 1 and not seen:
            try:
                run(sd3)
            except RuntimeError as error:
                seen.append(str(error))
        return kwargs

    try:
        run(sd3, callback_on_step_end=nested)
    finally:
        specdiff.disable(sd3)
    assert len(seen) == 1 and "in this thread" in seen[0] and "another thread" not in seen[0]


# -- randomness ----------------------------------------------------------------

def test_speculation_never_rewinds_the_global_random_state(sd3, monkeypatch):
    restores = []
    monkeypatch.setattr(torch, "set_rng_state", lambda state: restores.append(state))
    monkeypatch.setattr(torch.random, "set_rng_state", lambda state: restores.append(state))
    specdiff.enable(sd3, FAST)
    try:
        run(sd3, generator=None)
    finally:
        specdiff.disable(sd3)
    assert restores == []


@pytest.mark.parametrize("use_generator", [True, False])
def test_random_numbers_advance_exactly_as_in_plain_diffusers(sd3, use_generator):
    def one(enabled):
        torch.manual_seed(123)
        generator = torch.Generator().manual_seed(7) if use_generator else None
        if enabled:
            specdiff.enable(sd3, FAST)
        try:
            images = run(sd3, generator=generator)
        finally:
            if enabled:
                specdiff.disable(sd3)
        after = generator.get_state() if use_generator else None
        return images, torch.rand(4), after

    _, plain_next, plain_after = one(False)
    fast_images, fast_next, fast_after = one(True)
    assert torch.equal(plain_next, fast_next)  # the global generator moved exactly as in diffusers
    if use_generator:
        assert torch.equal(plain_after, fast_after)
    # the speculative pass saw the same initial noise as the real pass
    torch.manual_seed(123)
    specdiff.enable(sd3, FAST)
    try:
        seeded = run(sd3, generator=torch.Generator().manual_seed(7 if use_generator else 123))
    finally:
        specdiff.disable(sd3)
    torch.testing.assert_close(seeded, fast_images, rtol=0, atol=0)


# -- invalid values ------------------------------------------------------------

def _fields_of(kind):
    for name, (config_type, _) in POLICIES.items():
        hints = typing.get_type_hints(config_type)
        for field in dataclasses.fields(config_type):
            if hints[field.name] is kind:
                yield name, field.name


@pytest.mark.parametrize("method, field", list(_fields_of(float)))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "0.5", True])
def test_float_fields_refuse_nan_and_non_numbers(method, field, value):
    with pytest.raises(specdiff.ConfigError, match=field):
        specdiff.config_for(method, **{field: value})


@pytest.mark.parametrize("method, field", list(_fields_of(bool)))
@pytest.mark.parametrize("value", ["false", "true", 0, 1, None])
def test_bool_fields_refuse_non_bools(method, field, value):
    with pytest.raises(specdiff.ConfigError, match=field):
        specdiff.config_for(method, **{field: value})


def test_a_subclass_of_a_registered_config_is_accepted(sd3):
    @dataclasses.dataclass(frozen=True)
    class MyConfig(specdiff.FORAConfig):
        pass

    specdiff.enable(sd3, MyConfig(interval=2))
    try:
        run(sd3)
        assert specdiff.summary(sd3).method == "fora"
    finally:
        specdiff.disable(sd3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(seed=-1), "seed"), (dict(seed=2**70), "seed"), (dict(seed="0"), "seed"), (dict(seed=1.5), "seed"),
    (dict(num_inference_steps=0), "num_inference_steps"), (dict(num_inference_steps=2.0), "num_inference_steps"),
])
def test_enable_checks_its_own_arguments_at_once(sd3, kwargs, message):
    with pytest.raises(ValueError, match=message):
        specdiff.enable(sd3, FAST, **kwargs)
    assert not specdiff.is_enabled(sd3)


# -- bounded state ---------------------------------------------------------------

def test_a_bare_transformer_keeps_bounded_state_over_many_one_step_calls(sd3):
    transformer = sd3.transformer
    specdiff.enable(transformer, specdiff.RASConfig(warmup_steps=1), num_inference_steps=1)
    args = dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 8, 64),
                pooled_projections=torch.randn(1, 64), timestep=torch.tensor([1000.0]))

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    try:
        with torch.no_grad():
            for _ in range(5):
                transformer(**args)
            before = live_tensors()
            for _ in range(100):
                transformer(**args)
            after = live_tensors()
    finally:
        specdiff.disable(transformer)
    assert after <= before


# -- weights files -----------------------------------------------------------------

@pytest.fixture()
def model_copy(tmp_path):
    from specdiff.lab.embedded.pipeline import WEIGHTS_DIR

    copy = tmp_path / "model"
    shutil.copytree(WEIGHTS_DIR, copy)
    return copy


def _sums(folder):
    return folder / "SHA256SUMS"


@pytest.mark.parametrize("damage, message", [
    (lambda f: _sums(f).write_text(""), "no line"),
    (lambda f: _sums(f).write_text("\n".join(l for l in _sums(f).read_text().splitlines()
                                             if "safetensors" not in l) + "\n"), "no line"),
    (lambda f: _sums(f).write_text(_sums(f).read_text() + "not a checksum line\n"), "line"),
    (lambda f: _sums(f).write_text(_sums(f).read_text() + "0" * 64 + "  /dev/zero\n"), "outside"),
    (lambda f: _sums(f).write_text(_sums(f).read_text() + "0" * 64 + "  ../../etc/passwd\n"), "outside"),
])
def test_weights_checks_have_no_gaps(model_copy, damage, message):
    from specdiff.lab.embedded.pipeline import CorruptModelError, load_scene_pipeline

    damage(model_copy)
    with pytest.raises(CorruptModelError, match=message):
        load_scene_pipeline(model_copy)


def _write_pickle_as_safetensors(folder):
    torch.save({"weight": torch.zeros(2)}, folder / "transformer" / "diffusion_pytorch_model.safetensors")


def _write_json(path, value):
    path.write_text(value if isinstance(value, str) else __import__("json").dumps(value))


def _scheduler_shift(folder, shift):
    import json

    path = folder / "scheduler" / "scheduler_config.json"
    _write_json(path, {**json.loads(path.read_text()), "shift": shift})


@pytest.mark.parametrize("damage, message", [
    (_write_pickle_as_safetensors, "cannot be loaded"),
    (lambda f: _write_json(f / "transformer" / "config.json", "not json {"), "not a readable JSON file"),
    (lambda f: _write_json(f / "transformer" / "config.json", {"_class_name": "FluxTransformer2DModel", "num_layers": 1}),
     "FluxTransformer2DModel"),
    (lambda f: _scheduler_shift(f, "abc"), "shift must be a positive number"),
    (lambda f: _write_json(f / "scene_style.json", "[1, 2]"), "JSON object"),
    (lambda f: _write_json(f / "scene_style.json", {"style": "v9"}), "scene style must be one of"),
], ids=["pickle-as-safetensors", "config-not-json", "flux-config", "shift-abc", "style-not-object", "style-unknown"])
def test_a_scene_folder_damaged_consistently_with_its_checksums_is_one_line(model_copy, tmp_path, capsys, damage,
                                                                             message):
    """Checksums rewritten after the damage, so only the loader's own checks can catch it."""
    from specdiff.lab.cli import main
    from specdiff.lab.embedded.pipeline import write_checksums

    damage(model_copy)
    write_checksums(model_copy)
    for command in (["generate", "x"], ["bench", "--num-prompts", "1"]):
        assert main(command + ["--model", str(model_copy), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("specdiff: error:") and "\n" not in err and message in err, err
        assert not (tmp_path / "out").exists()


def test_an_output_folder_that_os_access_calls_writable_but_is_not_is_refused_first(tmp_path, capsys):
    """/sys accepts os.access(W_OK) from root and refuses every new file: refused before any work."""
    import os

    from specdiff.lab.cli import main

    target = "/sys/specdiff-out"
    if not os.path.isdir("/sys") or os.path.exists(target):
        pytest.skip("needs a /sys without specdiff-out")
    for command in (["generate", "x", "--steps", "2"], ["bench", "--num-prompts", "1"],
                    ["tune", "--target", "psnr>=20"]):
        assert main(command + ["--out", target]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("specdiff: error: --out /sys/specdiff-out: cannot write there") and "\n" not in err


def test_a_clip_model_in_pickle_form_is_refused_in_one_line(tmp_path, capsys):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from specdiff.lab.cli import main

    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=CLIPTextConfig(vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                                   **small).to_dict(),
                        vision_config=CLIPVisionConfig(image_size=32, patch_size=8, **small).to_dict(), projection_dim=16)
    folder = tmp_path / "clip"
    CLIPModel(config).save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save({"anything": __import__("datetime").date(2026, 1, 1)}, folder / "pytorch_model.bin")  # not weights-only
    assert main(["bench", "--num-prompts", "1", "--clip-model", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("specdiff: error: --clip-model") and "pickle" in err[-1]
    assert not (tmp_path / "out").exists()


def test_a_linked_or_special_model_file_is_refused_before_reading(model_copy, tmp_path):
    from specdiff.lab.embedded.pipeline import CorruptModelError, load_scene_pipeline

    config = model_copy / "scheduler" / "scheduler_config.json"
    outside = tmp_path / "elsewhere.json"
    shutil.move(config, outside)
    config.symlink_to(outside)
    with pytest.raises(CorruptModelError, match="symbolic link"):
        load_scene_pipeline(model_copy)
    config.unlink()
    config.symlink_to("/dev/zero")
    with pytest.raises(CorruptModelError, match="symbolic link"):
        load_scene_pipeline(model_copy)


# -- replaced parts, pickling, other caches ------------------------------------------

def test_a_replaced_transformer_is_named_and_disable_still_restores(sd3):
    original_class = type(sd3)
    old = sd3.transformer
    specdiff.enable(sd3, FAST)
    sd3.transformer = tiny_sd3_pipeline().transformer
    with pytest.raises(RuntimeError, match="replaced"):
        run(sd3)
    specdiff.disable(sd3)
    assert type(sd3) is original_class and not specdiff.is_enabled(old)
    assert "forward" not in vars(old)
    run(sd3)  # plain again


def test_pickling_an_enabled_pipeline_says_to_disable_first(sd3):
    specdiff.enable(sd3, FAST)
    try:
        with pytest.raises(TypeError, match="disable"):
            pickle.dumps(sd3)
    finally:
        specdiff.disable(sd3)


@pytest.mark.parametrize("peer", ["diffusers-taylorseer"])
def test_stacking_on_another_cache_is_refused_in_one_line(sd3, peer):
    from specdiff.lab.evaluation.peers import diffusers_cache

    with diffusers_cache(sd3, peer, {}):
        with pytest.raises(RuntimeError, match="diffusers"):
            specdiff.enable(sd3, FAST)
    assert not specdiff.is_enabled(sd3)


# -- the command line: one line, exit code 2, before any work, nothing written -----------

def _cli_cases(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    return [
        (["generate", "x", "--cache-ratio", "nan"], "cache_ratio"),
        (["generate", "x", "--method", "toca", "--recompute-ratio", "nan"], "recompute_ratio"),
        (["generate", "x", "--out", str(blocker / "sub")], "not a writable folder"),
        (["generate", "x", "--height", "33"], "multiple of 4"),  # the default model (v2): patch 4
        (["generate", "x", "--model", "embedded", "--height", "33"], "multiple of 2"),
        (["generate", "x", "--height", "-32"], "--height"),
        (["generate", "x", "--height", "256"], "at most 128"),  # v2: a position table of 32 x 32 patches of 4
        (["generate", "x", "--model", "embedded", "--height", "128"], "at most 64"),
        (["generate", "x", "--width", "0"], "--width"),
        (["generate", "x", "--seed", str(2**70)], "--seed"),
        (["generate", "x", "--device", "bogus"], "--device"),
        (["generate", "x", "--model", str(broken)], "model_index.json"),
        (["bench", "--num-prompts", "0"], "--num-prompts"),
        (["bench", "--batch-size", "0"], "--batch-size"),
        (["bench", "--prompts", str(binary), "--num-prompts", "1"], "UTF-8"),
    ] + ([] if torch.cuda.is_available() else [(["generate", "x", "--device", "cuda"], "no CUDA")])


def test_bad_command_lines_give_one_line_and_write_nothing(tmp_path, capsys):
    from specdiff.lab.cli import main

    for argv, message in _cli_cases(tmp_path):
        out = tmp_path / "out"
        argv = argv if "--out" in argv else argv + ["--out", str(out)]
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("specdiff: error:") and "\n" not in err and message in err, (argv, err)
        assert not out.exists(), argv


def test_pickle_weights_in_a_model_folder_are_refused(tmp_path, capsys):
    from specdiff.lab.cli import main

    tiny_sd3_pipeline().save_pretrained(tmp_path / "sd3", safe_serialization=False)
    capsys.readouterr()
    assert main(["generate", "x", "--model", str(tmp_path / "sd3"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # loading bars may come first
    assert last.startswith("specdiff: error:") and "safetensors" in last and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_ctrl_c_ends_with_one_line_and_exit_code_130(monkeypatch, tmp_path, capsys):
    import specdiff.lab.cli as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_pipeline", interrupted)
    assert cli.main(["generate", "x", "--out", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.strip() == "specdiff: interrupted"


def test_an_interrupted_bench_never_looks_finished(monkeypatch, tmp_path):
    import specdiff.lab.evaluation.benchmark as bench  # run_benchmark looks image_grid up here
    from specdiff.lab.cli import main

    out = tmp_path / "bench"
    args = ["bench", "--model", "tiny-sd3", "--methods", "full", "fora", "--num-prompts", "1", "--steps", "3",
            "--out", str(out)]
    assert main(args) == 0
    assert (out / "results.json").exists()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "image_grid", interrupted)
    assert main(args) == 130
    assert not (out / "results.json").exists()  # the old run's results are gone, the new one's never arrived
    assert not [p for p in out.iterdir() if p.name.startswith(".partial")]
