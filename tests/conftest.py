"""Shared by the tests: stock tiny pipelines (random weights, built offline) and the generate helper.
Nothing here reads a git checkout: the tests run from an installed copy too."""

from __future__ import annotations

import pytest
import torch

from specdiff.lab.tiny_pipelines import tiny_flux_pipeline, tiny_qwenimage_pipeline, tiny_sd3_pipeline

STEPS = 8


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed=0, steps=STEPS, **extra):
    """Images (a tensor) of one generation of "a red cat" at 64 x 64 px with a seeded generator."""
    arguments = dict(prompt="a red cat", num_inference_steps=steps, height=64, width=64, output_type="pt",
                     generator=torch.Generator().manual_seed(seed))
    arguments.update(extra)
    return pipe(**arguments).images


@pytest.fixture(scope="module")
def sd3():
    return quiet(tiny_sd3_pipeline())


@pytest.fixture(scope="module")
def flux():
    return quiet(tiny_flux_pipeline())


@pytest.fixture(scope="module")
def qwenimage():
    return quiet(tiny_qwenimage_pipeline())
