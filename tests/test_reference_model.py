"""The embedded model: scenes, shipped weights (offline, hash-checked), pipeline, and specdiff on it."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch

import specdiff
from specdiff.lab.embedded import scenes
from specdiff.lab.embedded.pipeline import WEIGHTS_DIR, CorruptModelError, load_scene_pipeline


def test_scenes_are_deterministic_and_captions_match():
    a = [scenes.sample_scene(random.Random(7)) for _ in range(3)]
    b = [scenes.sample_scene(random.Random(7)) for _ in range(3)]
    assert a == b
    scene = scenes.Scene("white", (scenes.SceneObject("red", "circle", "large", "top left"),))
    assert scene.caption() == "a large red circle at the top left on a white background"
    image = scenes.render(scene)
    assert image.shape == (32, 32, 3)
    assert np.allclose(image[1, 30], np.array(scenes.PALETTE["white"]) / 255)  # top right is background
    assert np.allclose(image[7, 7], np.array(scenes.PALETTE["red"]) / 255)  # the circle's centre
    edge = image[7, 7 + 7]  # anti-aliased rim: a blend of the two colours
    assert not np.allclose(edge, image[7, 7]) or not np.allclose(edge, image[1, 30])


def test_held_out_pairs_never_appear_in_training_scenes():
    rng = random.Random(0)
    for _ in range(2000):
        scene = scenes.sample_scene(rng, "train")
        assert all((o.colour, o.shape) not in scenes.HELD_OUT_PAIRS for o in scene.objects)
    held = scenes.held_out_prompts(20)
    assert all((s.objects[0].colour, s.objects[0].shape) in scenes.HELD_OUT_PAIRS for s in held)


@pytest.fixture(scope="module")
def scene_pipe():
    pipe = load_scene_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_model_loads_offline_and_generates(scene_pipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = scene_pipe(
        ["a large red circle at the top left on a white background", "a small blue ring at the right on a black background"],
        num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="pt",
    ).images
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    assert out.std() > 0.05  # an image, not a constant
    assert not list(WEIGHTS_DIR.rglob("*.bin"))  # safetensors only


def test_corrupt_weights_give_a_clear_error(tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(WEIGHTS_DIR, copy)
    weights = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptModelError, match="diffusion_pytorch_model.safetensors"):
        load_scene_pipeline(copy)
    weights.unlink()
    with pytest.raises(CorruptModelError, match="missing"):
        load_scene_pipeline(copy)


def test_specdiff_on_the_embedded_model(scene_pipe):
    kwargs = dict(prompt="a small green square in the center on a purple background", num_inference_steps=10,
                  output_type="pt")
    plain = scene_pipe(**kwargs, generator=torch.Generator().manual_seed(1)).images
    specdiff.enable(scene_pipe, specdiff.SpecDiffConfig(cache_ratio=0.0, warmup_steps=1))
    try:
        exact = scene_pipe(**kwargs, generator=torch.Generator().manual_seed(1)).images
    finally:
        specdiff.disable(scene_pipe)
    torch.testing.assert_close(exact, plain, rtol=1e-5, atol=1e-5)
    specdiff.enable(scene_pipe, specdiff.SpecDiffConfig(cache_ratio=0.9, warmup_steps=2))
    try:
        fast = scene_pipe(**kwargs, generator=torch.Generator().manual_seed(1)).images
        summary = specdiff.summary(scene_pipe)
    finally:
        specdiff.disable(scene_pipe)
    assert summary.computed_fraction() < 0.5
    assert torch.equal(scene_pipe(**kwargs, generator=torch.Generator().manual_seed(1)).images, plain)
    assert (fast - plain).abs().mean() < 0.25


def test_shipped_checker_reads_fresh_scenes():
    from specdiff.lab.embedded.checker import evaluate_checker, load_checker

    accuracy = evaluate_checker(load_checker(), count=300, seed=2024, degrade=True)
    assert all(accuracy[name] >= 0.97 for name in ("background", "colour", "shape", "size", "position")), accuracy


def test_alignment_scoring_counts_each_attribute():
    from specdiff.lab.embedded.alignment import lenient_hits

    asked = scenes.Scene("white", (scenes.SceneObject("red", "circle", "large", "top left"),))
    same = lenient_hits(asked, asked)
    assert all(v == [1] for v in same.values())
    moved = scenes.Scene("white", (scenes.SceneObject("red", "circle", "small", "center"),))
    hits = lenient_hits(asked, moved)
    assert hits["position"] == [0] and hits["colour"] == [1] and hits["size"] == [0]
    assert lenient_hits(asked, scenes.Scene("black", ()))["colour"] == [0]


def test_training_resumes_and_exports(tmp_path, capsys):
    from specdiff.lab.embedded.train import main as train

    run = tmp_path / "run"
    train(["--out", str(run), "--steps", "2", "--save-every", "1", "--batch-size", "2"])
    train(["--out", str(run), "--steps", "3", "--save-every", "1", "--batch-size", "2"])
    assert "resumed at step 2" in capsys.readouterr().out
    rows = (run / "loss.csv").read_text().splitlines()[1:]
    assert len(rows) == 3
    seconds = [float(row.split(",")[2]) for row in rows]
    assert seconds == sorted(seconds)  # the resumed run's clock continues from the log
    train(["--out", str(run), "--export", str(tmp_path / "model")])
    pipe = load_scene_pipeline(tmp_path / "model")
    assert (tmp_path / "model" / "training" / "loss.png").exists()
    assert pipe.transformer.config.num_layers == 4
