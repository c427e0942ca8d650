"""Checks at the call that gets them wrong, each one line naming the fix: copies and pickles of an
enabled model, another cache installed after enable, IP-Adapter loading, misplaced arguments."""

from __future__ import annotations

import copy
import pickle

import pytest

import specdiff
from conftest import generate


def test_copying_or_pickling_an_enabled_pipeline_or_transformer_names_the_fix(sd3):
    specdiff.enable(sd3, specdiff.RASConfig())
    try:
        with pytest.raises(TypeError, match="cannot be copied .* copy it before specdiff.enable"):
            copy.deepcopy(sd3)
        with pytest.raises(TypeError, match="cannot be copied|cannot be pickled"):
            copy.deepcopy(sd3.transformer)
        with pytest.raises(TypeError, match="call specdiff.disable first"):
            pickle.dumps(sd3.transformer)
    finally:
        specdiff.disable(sd3)
    copy.deepcopy(sd3.transformer)  # disabled: copies as before


def test_another_cache_installed_after_enable_is_refused_at_the_call(flux):
    from diffusers.hooks import FirstBlockCacheConfig

    specdiff.enable(flux, specdiff.RASConfig())
    try:
        flux.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
        with pytest.raises(RuntimeError, match="installed on this transformer after specdiff.enable") as error:
            generate(flux, steps=3)
        assert "\n" not in str(error.value)
        flux.transformer.disable_cache()
        generate(flux, steps=3)  # works again once the other cache is gone
    finally:
        specdiff.disable(flux)


def test_loading_an_ip_adapter_into_an_enabled_pipeline_names_the_fix(flux):
    """diffusers' load_ip_adapter re-creates every attention processor from its class with no argument."""
    specdiff.enable(flux, specdiff.SpecDiffConfig())
    try:
        for processor in set(map(type, flux.transformer.attn_processors.values())):
            with pytest.raises(RuntimeError, match=r"disable before loading an IP-Adapter \(specdiff.disable"):
                processor()
    finally:
        specdiff.disable(flux)


def test_misplaced_arguments_are_refused_when_given(sd3):
    with pytest.raises(TypeError, match="observer must be callable"):
        specdiff.enable(sd3, specdiff.RASConfig())
        try:
            specdiff.observe(sd3, 42)
        finally:
            specdiff.disable(sd3)
    with pytest.raises(ValueError, match="num_inference_steps=5"):
        specdiff.enable(sd3, specdiff.RASConfig(), num_inference_steps=5)
    assert not specdiff.is_enabled(sd3)
    with pytest.raises(ValueError, match="recompile_limit=...\\) must be an integer"):
        specdiff.compile_blocks(sd3, recompile_limit="abc")


def test_a_summary_shows_speculation_only_for_methods_that_speculate(sd3):
    for config, shown in ((specdiff.RASConfig(), False), (specdiff.SpecDiffConfig(warmup_steps=2), True)):
        with specdiff.accelerated(sd3, config) as last:
            generate(sd3, steps=4)
            text = str(last())
        assert ("speculation" in text.splitlines()[-2]) is shown


def test_summary_configs_are_json_fields(sd3):
    import json

    config = specdiff.SpecDiffConfig(warmup_steps=2, reset_steps=(3,))
    with specdiff.accelerated(sd3, config) as last:
        generate(sd3, steps=4)
        record = json.loads(json.dumps(last().to_dict()))
    assert record["config"]["warmup_steps"] == 2 and record["config"]["reset_steps"] == [3]


def test_the_command_line_has_a_version(capsys):
    from specdiff.lab.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"specdiff {specdiff.__version__}"
