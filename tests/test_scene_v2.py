"""V2 scenes (open detail, 64 px, up to three objects), the strict scene metric, and the two readers."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from specdiff.lab.embedded import scenes
from specdiff.lab.embedded.alignment import chance_level, lenient_accuracy, strict_accuracy, strict_hits
from specdiff.lab.embedded.scenes import V1, V2, Scene, SceneObject

RED_CIRCLE = SceneObject("red", "circle", "large", "top left")
BLUE_RING = SceneObject("blue", "ring", "small", "bottom right")


def test_strict_metric_needs_the_asked_object_in_its_cell_and_nothing_else():
    asked = Scene("white", (RED_CIRCLE, BLUE_RING))
    assert strict_hits(asked, asked)["exact"] == 1
    extra = Scene("white", (RED_CIRCLE, BLUE_RING, SceneObject("green", "square", "small", "center")))
    scored = strict_hits(asked, extra)
    assert scored["exact"] == 0 and scored["unasked"] == 1
    assert all(v == [1, 1] for k, v in scored["hits"].items() if k != "background")
    # the lenient score credits a colour found anywhere; the strict one only in the asked cell
    elsewhere = Scene("white", (dataclasses.replace(RED_CIRCLE, position="center"), BLUE_RING))
    assert strict_hits(asked, elsewhere)["hits"]["colour"] == [0, 1]
    assert lenient_accuracy([asked], [elsewhere])["colour"] == 1.0
    # an unnamed size is not scored; an unnamed position matches the object anywhere
    loose = Scene("white", (dataclasses.replace(RED_CIRCLE, says_size=False, says_position=False),))
    drawn = Scene("white", (dataclasses.replace(RED_CIRCLE, size="small", position="bottom"),))
    scored = strict_hits(loose, drawn)
    assert scored["exact"] == 1 and scored["hits"]["size"] == [] and scored["hits"]["position"] == []


def test_chance_level_scores_other_prompts_images():
    prompts = scenes.held_out_prompts(12, style=V2)
    assert strict_accuracy(prompts, prompts)["exact_scene"] == 1.0
    chance = chance_level(prompts, prompts)
    assert chance["exact_scene"] < 0.2 and chance["colour"] < 0.5


def test_v2_prompt_sets_are_stratified_and_captions_parse_back():
    prompts = scenes.held_out_prompts(30, style=V2)
    counts = sorted(len(s.objects) for s in prompts)
    assert counts.count(1) == counts.count(2) == counts.count(3) == 10
    assert all((p.objects[0].colour, p.objects[0].shape) in scenes.HELD_OUT_PAIRS for p in prompts)
    rng = random.Random(3)
    for _ in range(500):
        scene = scenes.sample_scene(rng, "train", V2)
        parsed = scenes.parse_caption(scene.caption())
        assert parsed is not None and parsed.background == scene.background
        assert [(o.colour, o.shape, o.says_size, o.says_position) for o in parsed.objects] == \
            [(o.colour, o.shape, o.says_size, o.says_position) for o in scene.objects]
    assert scenes.parse_caption("a photo of a dog") is None


def test_v2_renders_have_open_detail_and_keep_v1_unchanged():
    assert scenes.render(Scene("white", (RED_CIRCLE,)), style=V2).shape == (64, 64, 3)
    assert scenes.caption_spread(V2) > 2 * scenes.caption_spread(V1)  # one caption, many images
    # V1's data stream is what the shipped v1 weights were trained on: unchanged
    images, _, captions, _ = scenes.make_batch(random.Random(3), 4)
    assert images.shape == (4, 3, 32, 32)
    assert captions[0] == scenes.make_batch(random.Random(3), 1)[2][0]


def test_training_never_renders_held_out_fills():
    rng = random.Random(0)
    drawn = {scenes._object_fill(shape, rng, "train") for shape in scenes.SHAPES for _ in range(50)}
    assert drawn <= set(scenes.OBJECT_FILLS)
    for shape in scenes.SHAPES:
        assert all((scenes._object_fill(shape, rng, "train"), shape) not in scenes.HELD_OUT_FILLS for _ in range(50))


@pytest.mark.parametrize("style", [V1, V2], ids=["v1", "v2"])
def test_pixel_reader_reads_clean_renders(style):
    from specdiff.lab.embedded.pixel_reader import read_scene

    rng = random.Random(11)
    asked = [scenes.sample_scene(rng, "heldout" if i % 4 == 0 else "train", style) for i in range(160)]
    asked = [dataclasses.replace(s, objects=tuple(dataclasses.replace(o, says_size=True, says_position=True)
                                                  for o in s.objects)) for s in asked]
    seen = [read_scene(scenes.render(s, rng, style=style)) for s in asked]
    result = strict_accuracy(asked, seen)
    assert result["exact_scene"] >= 0.94, result
    assert all(result[k] >= 0.97 for k in ("background", "colour", "shape", "size", "position")), result


def test_v2_checker_agrees_with_the_pixel_reader():
    """Two independent readers (a CNN and pixel statistics) of the same fresh V2 renders."""
    from specdiff.lab.embedded.checker import load_checker, read_images, render_batch
    from specdiff.lab.embedded.pixel_reader import read_scene

    rng = random.Random(2027)
    asked = [scenes.sample_scene(rng, "heldout" if i % 5 == 0 else "train", V2) for i in range(120)]
    images = render_batch(asked, rng, style=V2)
    by_checker = read_images(load_checker(V2), images)
    by_pixels = [read_scene(img.permute(1, 2, 0).numpy()) for img in images]
    agree = np.mean([(a.background, set(a.objects)) == (b.background, set(b.objects))
                     for a, b in zip(by_checker, by_pixels)])
    assert agree >= 0.93, agree
    full = [dataclasses.replace(s, objects=tuple(dataclasses.replace(o, says_size=True, says_position=True)
                                                 for o in s.objects)) for s in asked]
    assert strict_accuracy(full, by_checker)["exact_scene"] >= 0.95


def test_v2_model_starts_exactly_from_v1_weights():
    from specdiff.lab.embedded.model import build_transformer
    from specdiff.lab.embedded.pipeline import load_scene_pipeline
    from specdiff.lab.embedded.train import adapt_patch_size

    v1 = load_scene_pipeline().transformer
    v2 = build_transformer(V2)
    v2.load_state_dict(adapt_patch_size(v1.state_dict(), 2, 4))
    gen = torch.Generator().manual_seed(0)
    x, tokens, pooled = (torch.randn(shape, generator=gen) for shape in ((2, 3, 32, 32), (2, 24, 384), (2, 384)))
    t = torch.tensor([300.0, 900.0])
    with torch.no_grad():
        small = v1(x, tokens, pooled, t).sample
        large = v2(torch.nn.functional.interpolate(x, scale_factor=2), tokens, pooled, t).sample
    torch.testing.assert_close(large, torch.nn.functional.interpolate(small, scale_factor=2), atol=1e-3, rtol=1e-3)
    assert (large - torch.nn.functional.interpolate(small, scale_factor=2)).abs().mean() < 1e-5


def test_v2_training_runs_resumes_and_exports_small_shards(tmp_path):
    from specdiff.lab.embedded.pipeline import load_scene_pipeline
    from specdiff.lab.embedded.train import main as train

    run = tmp_path / "run"
    train(["--style", "v2", "--out", str(run), "--steps", "2", "--save-every", "1", "--batch-size", "2",
           "--device", "cpu"])
    train(["--style", "v2", "--out", str(run), "--steps", "3", "--save-every", "1", "--batch-size", "2"])
    train(["--out", str(run), "--export", str(tmp_path / "model")])
    shards = list((tmp_path / "model" / "transformer").glob("*.safetensors"))
    assert shards and all(p.stat().st_size <= 16 * 2**20 for p in shards)
    pipe = load_scene_pipeline(tmp_path / "model")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.style is V2
    out = pipe("a large red circle, a small blue ring at the top and a green square on a white background",
               num_inference_steps=2, output_type="pt").images
    assert out.shape == (1, 3, 64, 64)


def test_training_on_cuda_is_refused_clearly_without_a_gpu(tmp_path):
    from specdiff.lab.embedded.train import main as train

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="no CUDA"):
        train(["--style", "v2", "--out", str(tmp_path / "run"), "--steps", "1", "--device", "cuda"])


def test_the_shipped_v2_weights_load_hash_checked_and_draw_64_px(monkeypatch):
    from specdiff.lab.loading import load_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe, description = load_pipeline("embedded-v2", "cpu", "float32")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.style is V2 and description == "embedded-v2 scene model"
    out = pipe("a large red circle at the top left and a small blue ring in the center on a white background",
               num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (1, 3, 64, 64) and out.std() > 0.05


def _batches(workers: int, start: int, count: int):
    from specdiff.lab.embedded.train import SceneBatches

    loader = torch.utils.data.DataLoader(SceneBatches(V2, 2, 7, start), batch_size=None, num_workers=workers)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == count:
            return out


def test_rendering_workers_give_the_same_batches_in_step_order_for_any_worker_count():
    one, two = _batches(0, 0, 4), _batches(2, 0, 4)
    for a, b in zip(one, two):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
        assert a[2] == b[2]
    assert one[0][2] != one[1][2]  # each step its own batch
    resumed = _batches(2, 2, 2)  # a run resumed at step 2 continues the same stream
    assert [b[2] for b in resumed] == [b[2] for b in one[2:]]


def test_learning_rate_warms_up_then_decays_to_zero_by_steps_or_by_the_time_budget():
    from specdiff.lab.embedded.train import learning_rate, parse_args

    args = parse_args(["--out", "x", "--steps", "1000", "--warmup", "10", "--lr", "1.0"])
    assert learning_rate(args, 0, 0.0) == pytest.approx(0.1)
    assert learning_rate(args, 999, 1e9) == 1.0  # no decay asked
    args = parse_args(["--out", "x", "--steps", "1000", "--warmup", "10", "--lr", "1.0", "--lr-decay", "cosine",
                       "--decay-start", "500"])
    assert learning_rate(args, 400, 0.0) == 1.0
    assert learning_rate(args, 750, 0.0) == pytest.approx(0.5)
    assert learning_rate(args, 1000, 0.0) == pytest.approx(0.0, abs=1e-12)
    args.minutes = 10.0  # the time budget decays it sooner when it runs out first
    assert learning_rate(args, 501, 300.0) == pytest.approx(0.5, abs=1e-2)
    assert learning_rate(args, 501, 600.0) == pytest.approx(0.0, abs=1e-12)


def test_a_larger_model_trains_with_workers_stops_on_its_time_budget_and_exports_its_size(tmp_path):
    from specdiff.lab.embedded.pipeline import load_scene_pipeline
    from specdiff.lab.embedded.train import main as train

    run = tmp_path / "run"
    common = ["--style", "v2", "--out", str(run), "--batch-size", "2", "--save-every", "100", "--workers", "1"]
    train(common + ["--steps", "2", "--layers", "2", "--heads", "2", "--precision", "bf16", "--lr-decay", "cosine"])
    train(common + ["--steps", "1000", "--minutes", "1e-9"])  # no time: stops at once, still checkpoints
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and state["overrides"] == {"num_layers": 2, "num_attention_heads": 2}
    with pytest.raises(SystemExit, match="--layers / --heads"):
        train(common + ["--steps", "3", "--layers", "4"])
    train(["--out", str(run), "--export", str(tmp_path / "model")])
    pipe = load_scene_pipeline(tmp_path / "model")
    assert (pipe.transformer.config.num_layers, pipe.transformer.config.num_attention_heads) == (2, 2)


@pytest.mark.parametrize("flags, field", [
    (["--workers", "-1"], "--workers"), (["--layers", "0"], "--layers"), (["--minutes", "0"], "--minutes"),
    (["--lr-decay", "cosine", "--decay-start", "5", "--steps", "5"], "--decay-start"),
    (["--object-margin", "-2"], "--object-margin"),
])
def test_training_refuses_bad_numbers_in_one_line_before_any_work(tmp_path, flags, field):
    from specdiff.lab.embedded.train import main as train

    with pytest.raises(SystemExit, match=field):
        train(["--style", "v2", "--out", str(tmp_path / "run")] + flags)
    assert not (tmp_path / "run").exists()


def test_the_object_margin_weights_a_rings_hole_and_edge_but_not_the_far_background():
    from specdiff.lab.embedded.train import loss_weight

    ring = Scene("white", (SceneObject("red", "ring", "small", "center"),))
    _, mask = scenes.render(ring, random.Random(0), 0.0, with_mask=True, style=V2)
    masks = torch.from_numpy(mask)[None]
    centre, corner = V2.image_size // 2, (0, 0)
    plain, margin = loss_weight(masks, 4.0, 0), loss_weight(masks, 4.0, 4)
    assert plain[0, 0, centre, centre] == 1.0 and margin[0, 0, centre, centre] == 5.0  # the hole
    assert margin[0, 0, corner[0], corner[1]] == plain[0, 0, corner[0], corner[1]] == 1.0
    assert torch.equal(plain[0, 0] > 1, masks[0] > 0)  # no margin: the object's own pixels, as before
    assert (margin > 1).sum() > 2 * (plain > 1).sum()


def test_the_compact_text_encoder_is_minilm_in_fp16_for_captions_and_refuses_other_words(tmp_path):
    from specdiff.lab.embedded.text_encoder import SceneTextEncoder, export_compact

    export_compact(tmp_path / "minilm")
    assert sum(f.stat().st_size for f in (tmp_path / "minilm").iterdir()) < 25e6
    full = SceneTextEncoder(max_tokens=V2.max_tokens)
    compact = SceneTextEncoder(max_tokens=V2.max_tokens, path=tmp_path / "minilm")
    rng = random.Random(3)
    captions = [scenes.sample_scene(rng, "train", V2).caption() for _ in range(24)] + [""]
    captions += [s.caption() for s in scenes.held_out_prompts(8, style=scenes.V2)]
    tokens, pooled = compact(captions)
    full.model.half().float()  # the same weights rounded to fp16: then the same function
    want_tokens, want_pooled = full(captions)
    torch.testing.assert_close(tokens, want_tokens, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="elephant"):
        compact(["a red elephant on a white background"])


def test_the_breakdown_scores_each_object_count_and_counts_shapes_asked_against_shapes_read():
    from specdiff.lab.evaluation.breakdown import breakdown, table

    one = Scene("white", (RED_CIRCLE,))
    two = Scene("white", (RED_CIRCLE, BLUE_RING))
    ring_as_circle = Scene("white", (RED_CIRCLE, dataclasses.replace(BLUE_RING, shape="circle")))
    result = breakdown([one, two, two], [one, two, ring_as_circle])
    assert result["rows"]["1 object"]["exact_scene"] == 1.0
    assert result["rows"]["2 objects"]["exact_scene"] == 0.5 and result["rows"]["2 objects"]["shape"] == 0.75
    assert result["rows"]["all"]["exact_scene"] == pytest.approx(2 / 3)
    assert result["shape_confusion"] == {"circle -> circle": 3, "ring -> circle": 1, "ring -> ring": 1}
    assert "| heldout | 2 objects | 50.0% |" in table({"heldout": result})


def test_the_evaluation_runs_on_a_training_run_folder_and_refuses_other_folders(tmp_path, capsys):
    from specdiff.lab.evaluation.breakdown import main as evaluate
    from specdiff.lab.embedded.train import main as train

    run = tmp_path / "run"
    train(["--style", "v2", "--out", str(run), "--steps", "1", "--batch-size", "2", "--layers", "1"])
    results = evaluate(["--model", str(run), "--num-prompts", "3", "--steps", "2", "--out", str(tmp_path / "e.json")])
    assert set(results) == {"train", "heldout"}
    assert set(results["heldout"]["rows"]) == {"all", "1 object", "2 objects", "3 objects"}
    assert "| train | all |" in capsys.readouterr().out and (tmp_path / "e.json").exists()
    with pytest.raises(SystemExit, match="--model"):
        evaluate(["--model", str(tmp_path), "--num-prompts", "1"])


@pytest.mark.parametrize("old, new", [(2, 3), (4, 7)])
def test_a_deeper_model_starts_computing_what_the_shallower_one_did(old, new):
    from specdiff.lab.embedded.model import build_transformer
    from specdiff.lab.embedded.train import grow_depth

    torch.manual_seed(0)
    small = build_transformer(V2, num_layers=old)
    for module in small.modules():  # diffusers zero-initialises nothing here, but make every gate matter
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.05)
    large = build_transformer(V2, num_layers=new)
    large.load_state_dict(grow_depth(small.state_dict(), old, new))
    gen = torch.Generator().manual_seed(1)
    x, tokens, pooled = (torch.randn(shape, generator=gen) for shape in ((2, 3, 64, 64), (2, 40, 384), (2, 384)))
    t = torch.tensor([300.0, 900.0])
    with torch.no_grad():
        expected = small(x, tokens, pooled, t).sample
        grown = large(x, tokens, pooled, t).sample
        other = build_transformer(V2, num_layers=new)(x, tokens, pooled, t).sample
    torch.testing.assert_close(grown, expected, atol=1e-5, rtol=1e-5)
    assert (other - expected).abs().mean() > 1e-2  # the comparison can fail
    new_gates = large.transformer_blocks[1].norm1.linear.bias.detach()
    assert new_gates.abs().sum() > 0  # the copy keeps its shifts and scales; only the gates are zero
