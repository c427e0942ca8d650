"""Shared by the tests: stock tiny pipelines (random weights, built offline) and the generate helper.
Nothing here reads a git checkout: the tests run from an installed copy too."""

from __future__ import annotations

import pytest
import torch

from specdiff.lab.tiny_pipelines import (tiny_flux2_klein_pipeline, tiny_flux_pipeline, tiny_qwenimage_pipeline,
                                        tiny_sd3_pipeline, tiny_wan_pipeline, tiny_zimage_pipeline)

STEPS = 8


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


# per family, what a short test call needs besides the common arguments (video: a few frames)
CALL_DEFAULTS = {"WanPipeline": dict(num_frames=5, max_sequence_length=16, guidance_scale=1.0),  # one call per step
                 # the tiny text encoder has one layer; guidance 1: one call per step
                 "Flux2KleinPipeline": dict(text_encoder_out_layers=(1, 1, 1), max_sequence_length=16,
                                            guidance_scale=1.0),
                 "ZImagePipeline": dict(max_sequence_length=32)}  # CFG: [cond, uncond] rows of one call


def outputs(result):
    """The images, or a video pipeline's frames."""
    return result.images if hasattr(result, "images") else result.frames


def generate(pipe, seed=0, steps=STEPS, **extra):
    """Images (a tensor; frames for video) of one generation of "a red cat" at 64 x 64 px, seeded."""
    arguments = dict(prompt="a red cat", num_inference_steps=steps, height=64, width=64, output_type="pt",
                     generator=torch.Generator().manual_seed(seed), **CALL_DEFAULTS.get(type(pipe).__name__, {}))
    if type(pipe).__name__ == "WanPipeline" and "num_images_per_prompt" in extra:  # a video pipeline's name for it
        extra = dict(extra, num_videos_per_prompt=extra.pop("num_images_per_prompt"))
    arguments.update(extra)
    return outputs(pipe(**arguments))


@pytest.fixture(scope="module")
def sd3():
    return quiet(tiny_sd3_pipeline())


@pytest.fixture(scope="module")
def flux():
    return quiet(tiny_flux_pipeline())


@pytest.fixture(scope="module")
def flux2():
    return quiet(tiny_flux2_klein_pipeline())


@pytest.fixture(scope="module")
def zimage():
    return quiet(tiny_zimage_pipeline())


@pytest.fixture(scope="module")
def qwenimage():
    return quiet(tiny_qwenimage_pipeline())


@pytest.fixture(scope="module")
def wan():
    return quiet(tiny_wan_pipeline())
