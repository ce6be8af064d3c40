"""fit-vlm: a tiny fit writes a folder that transformers loads and that answers; phase 2's forward on
cached tower tokens is LLaVA's own; the fit is deterministic for a seed."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from misp_dpo.embed import synth
from misp_dpo.embed.fit_clip import SynthData
from misp_dpo.eval import fit_vlm
from misp_dpo.eval.fit_vlm import FitVlmConfig, SequenceBank, logits_from_tokens, read_corpus, tower_tokens
from misp_dpo.eval.vlm_build import build_model, build_processor

TINY = {
    "tower_steps": 3,
    "comparison_steps": 2,
    "steps": 4,
    "tower_batch_size": 8,
    "batch_size": 8,
    "vision_hidden": 32,
    "vision_layers": 1,
    "hidden": 32,
    "layers": 1,
    "holdout": 0.25,
}


def _data(n: int, seed: int = 0) -> SynthData:
    rng = np.random.default_rng(seed)
    attrs = synth.draw_attributes(n, rng)
    pixels = torch.stack(
        [torch.from_numpy(np.array(synth.render(a, rng))).permute(2, 0, 1) for a in attrs]
    ).contiguous()
    names = list(synth.ATTRIBUTES)
    codes = np.array([[synth.ATTRIBUTES[k].index(a[k]) for k in names] for a in attrs], dtype=np.int64)
    return SynthData(pixels, codes, names, [list(synth.ATTRIBUTES[k]) for k in names])


def _chat(processor: object, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)  # type: ignore[attr-defined,no-any-return]


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="holdout"):
        FitVlmConfig(holdout=1.0)
    with pytest.raises(ValueError, match="steps"):
        FitVlmConfig(steps=-1)
    with pytest.raises(ValueError, match="comparison_steps"):
        FitVlmConfig(comparison_steps=-1)


def test_saved_folder_loads_with_auto_classes_and_generates(tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    fitted = fit_vlm.fit_vlm(_data(24), FitVlmConfig(**TINY))
    written = fit_vlm.save_vlm(fitted, tmp_path / "vlm")
    names = {p.name for p in written}
    assert {"config.json", "model.safetensors", "metrics.json", "curves.png"} <= names
    metrics = json.loads((tmp_path / "vlm" / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"all", *synth.ATTRIBUTES}
    assert metrics["probes"] == 6 * 2 * len(synth.ATTRIBUTES) and len(metrics["loss_every_10_steps"]) == 3

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "vlm").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "vlm")
    prompt = _chat(processor, "Is the shape red?")
    image = Image.new("RGB", (64, 64), (220, 40, 40))
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == 17
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(processor.decode(out[0, inputs["input_ids"].shape[1] :]), str)


def test_forward_on_cached_tokens_equals_llava_forward() -> None:
    cfg = FitVlmConfig(**TINY)
    processor = build_processor(cfg.size)
    model = build_model(cfg.size, processor, seed=0)
    data = _data(2)
    bank = SequenceBank(processor, cfg.size.image_tokens)
    ids = torch.tensor([bank.prompt("Is the shape red?")] * 2)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        ours = logits_from_tokens(model, tower_tokens(model, data.pixels, processor), ids, mask)
        pixels = fit_vlm.pixel_values(data.pixels, processor)
        theirs = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # the processor makes the same pixel values and prompt ids from PIL images
    images = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in data.pixels]
    inputs = processor(text=[_chat(processor, "Is the shape red?")] * 2, images=images, return_tensors="pt")
    torch.testing.assert_close(inputs["pixel_values"], pixels, rtol=1e-4, atol=1e-4)
    assert inputs["input_ids"].tolist() == ids.tolist()


def test_fit_is_deterministic_for_a_seed_and_trains() -> None:
    data = _data(24)
    first = fit_vlm.fit_vlm(data, FitVlmConfig(**TINY))
    second = fit_vlm.fit_vlm(data, FitVlmConfig(**TINY))
    again = second.model.state_dict()
    for name, weights in first.model.state_dict().items():
        assert torch.equal(weights, again[name]), name
    untrained = build_model(FitVlmConfig(**TINY).size, first.processor, seed=0).state_dict()
    moved = [k for k, v in first.model.state_dict().items() if not torch.equal(v, untrained[k])]
    assert any("vision_tower" in k for k in moved) and any("language_model" in k for k in moved)
    assert any("multi_modal_projector" in k for k in moved)


def test_reads_a_synth_corpus(synth_corpus: Path) -> None:
    data = read_corpus(synth_corpus)
    assert data.pixels.shape == (240, 3, 64, 64) and data.pixels.dtype == torch.uint8
    assert data.names == list(synth.ATTRIBUTES) and data.codes.shape == (240, len(synth.ATTRIBUTES))
    first = data.attributes(data.codes[0])
    assert synth.caption(first)


def test_dihedral_moves_each_shape_to_its_relabelled_quadrant() -> None:
    rng = np.random.default_rng(0)
    positions = synth.ATTRIBUTES["position"]
    attrs = [
        {"shape": "square", "color": "red", "size": "large", "position": p, "background": "white"}
        for p in positions * 6
    ]
    pixels = torch.stack([torch.from_numpy(np.array(synth.render(a, rng))).permute(2, 0, 1) for a in attrs])
    names = list(synth.ATTRIBUTES)
    codes = torch.tensor([[synth.ATTRIBUTES[k].index(a[k]) for k in names] for a in attrs])
    turned, relabelled, kept = fit_vlm.dihedral(pixels, codes, names, np.random.default_rng(1))
    assert 0 < int(kept.sum()) < len(attrs) and torch.equal(turned[kept], pixels[kept])
    assert torch.equal(relabelled[:, [0, 1, 2, 4]], codes[:, [0, 1, 2, 4]])
    for image, code in zip(turned, relabelled, strict=True):
        ys, xs = torch.nonzero(image.float().sum(0) < 600, as_tuple=True)  # the red shape on white
        label = positions[int(code[names.index("position")])]
        assert ("right" in label) == (float(xs.float().mean()) > 32)
        assert ("bottom" in label) == (float(ys.float().mean()) > 32)


def test_reasoned_answers_state_the_attribute_then_conclude() -> None:
    from misp_dpo.eval.scoring import parse_answer

    attrs = {"shape": "star", "color": "blue", "size": "small", "position": "top left", "background": "gray"}
    rng = np.random.default_rng(0)
    prompt, answer = fit_vlm.yes_no(attrs, "color", False, rng, reasoned=True)
    assert prompt == synth.question("color", prompt.split()[-1].rstrip("?")) and "blue" not in prompt
    assert answer.startswith("The shape is blue,") and parse_answer(answer) == "no"
    prompt, answer = fit_vlm.yes_no(attrs, "position", True, rng, reasoned=True)
    assert prompt == synth.question("position", "top left") and parse_answer(answer) == "yes"
    assert fit_vlm.yes_no(attrs, "shape", True, rng) == (synth.question("shape", "star"), "Yes")


def test_recolour_permutes_channels_and_leaves_grays_alone() -> None:
    rng = np.random.default_rng(0)
    pixels = torch.randint(0, 256, (64, 3, 4, 4), dtype=torch.uint8)
    pixels[:, :, 0, 0] = 128  # a gray pixel in every image
    turned, same = fit_vlm.recolour(pixels, 0.5, rng)
    assert 16 < int((~same).sum()) < 48
    assert torch.equal(turned[same], pixels[same])
    for before, after in zip(pixels[~same], turned[~same], strict=True):
        orders = [o for o in itertools.permutations(range(3)) if torch.equal(before[list(o)], after)]
        assert orders and (0, 1, 2) not in orders  # a permutation, never the identity
        assert torch.equal(after[:, 0, 0], torch.full((3,), 128, dtype=torch.uint8))
    untouched, same = fit_vlm.recolour(pixels, 0.0, rng)
    assert bool(same.all()) and torch.equal(untouched, pixels)


def test_tower_loss_ignores_the_labels_a_recolouring_voids() -> None:
    logits = torch.randn(6, 5)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    shown = torch.tensor([True, True, False, True, False, True])
    loss = fit_vlm._head_loss(logits, labels, shown)
    other = labels.clone()
    other[~shown] = 1  # another label where it does not hold: the same loss
    assert torch.equal(loss, fit_vlm._head_loss(logits, other, shown))
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits[shown], labels[shown]))


def test_near_misses_ask_a_value_sharing_a_word_with_the_truth() -> None:
    attrs = {"shape": "star", "color": "blue", "size": "small", "position": "top left", "background": "gray"}
    rng = np.random.default_rng(0)
    asked = [fit_vlm.yes_no(attrs, "position", False, rng, near_miss=1.0)[0] for _ in range(60)]
    assert set(asked) == {synth.question("position", v) for v in ("top right", "bottom left")}
    uniform = {fit_vlm.yes_no(attrs, "position", False, rng, near_miss=0.0)[0] for _ in range(60)}
    assert synth.question("position", "bottom right") in uniform
    # a value without a near miss (colour: one word each) falls back to uniform
    colours = {fit_vlm.yes_no(attrs, "color", False, rng, near_miss=1.0)[0] for _ in range(60)}
    assert len(colours) == 4
    with pytest.raises(ValueError, match="near_miss"):
        FitVlmConfig(near_miss=1.5)


def test_prior_led_yes_asks_only_usual_values_the_image_lacks() -> None:
    from misp_dpo.embed import synth_world as world
    from misp_dpo.eval.scoring import parse_answer

    names = list(synth.ATTRIBUTES)
    rows = world.draw(2000, 0.7, np.random.default_rng(0))
    codes = np.array([[synth.ATTRIBUTES[k].index(r[k]) for k in names] for r in rows], dtype=np.int64)
    data = SynthData(
        torch.zeros(len(rows), 3, 1, 1), codes, names, [list(synth.ATTRIBUTES[k]) for k in names]
    )
    prior = world.Cooccurrence(rows)
    picked = np.arange(len(rows))
    asking = {synth.question(a, v): (a, v) for a in names for v in synth.ATTRIBUTES[a]}  # one each
    assert len(asking) == sum(len(values) for values in synth.ATTRIBUTES.values())

    def sampled(
        share: float, cooc: world.Cooccurrence | None, reasoned: bool = True
    ) -> list[tuple[str, str]]:
        cfg = FitVlmConfig(question_share=1.0, prior_yes=share, reasoned=reasoned)
        return fit_vlm.sample_sequences(data, picked, cfg, np.random.default_rng(1), cooc)

    def wrong_yes(items: list[tuple[str, str]]) -> list[bool]:
        return [
            parse_answer(answer) == "yes" and row[asking[question][0]] != asking[question][1]
            for row, (question, answer) in zip(rows, items, strict=True)
        ]

    def led_share(items: list[tuple[str, str]]) -> float:
        return float(np.mean(wrong_yes(items)))

    every = sampled(1.0, prior)
    for row, (question, answer), led_yes in zip(rows, every, wrong_yes(every), strict=True):
        attribute, value = asking[question]
        if led_yes:  # a prior-led yes
            assert value in prior.prior_guesses(row, attribute) and value in answer
        elif parse_answer(answer) == "no":  # every "no" left is one the prior suggests nothing for
            assert attribute not in world.PRIOR_ATTRIBUTES or not prior.prior_guesses(row, attribute)
    led = led_share(every)
    assert 0.27 < led < 0.33  # half are "no" questions, 3 of 5 attributes, all with a guess
    assert 0.06 < led_share(sampled(0.25, prior)) < 0.09  # a quarter of those
    bare = sampled(1.0, prior, reasoned=False)  # unreasoned: the same questions, a bare "Yes"
    assert led_share(bare) == pytest.approx(led) and {a for _, a in bare} == {"Yes", "No"}
    # a share of 0 draws nothing more: the fitting of before the prior-led yes, item for item
    assert sampled(0.0, prior) == sampled(0.0, None)
    with pytest.raises(ValueError, match="prior_yes"):
        FitVlmConfig(prior_yes=-0.1)


def test_comparison_items_are_decided_by_the_stated_word_alone() -> None:
    from misp_dpo.eval.scoring import parse_answer

    names = list(synth.ATTRIBUTES)
    items = fit_vlm.comparison_items(
        names, [list(synth.ATTRIBUTES[n]) for n in names], 200, np.random.default_rng(0)
    )
    labels = []
    for prompt, answer in items:
        stated = answer.split(",")[0]
        asked = next(v for a in names for v in synth.ATTRIBUTES[a] if synth.question(a, v) == prompt)
        labels.append(parse_answer(answer))
        assert (labels[-1] == "yes") == stated.endswith(asked)
    assert 0.35 < labels.count("yes") / len(labels) < 0.65


def test_greedy_answers_on_cached_tokens_match_generate() -> None:
    cfg = FitVlmConfig(**TINY)
    processor = build_processor(cfg.size)
    model = build_model(cfg.size, processor, seed=3)
    data = _data(2)
    bank = SequenceBank(processor, cfg.size.image_tokens)
    probes = [
        fit_vlm.Probe(0, "color", synth.question("color", "red"), "Yes"),
        fit_vlm.Probe(1, "position", synth.question("position", "top left"), "No"),
    ]
    ours = fit_vlm.greedy_answers(model, tower_tokens(model, data.pixels, processor), probes, bank, 5)
    for probe, answer in zip(probes, ours, strict=True):
        ids = torch.tensor([bank.prompt(probe.prompt)])
        pixels = fit_vlm.pixel_values(data.pixels[probe.row : probe.row + 1], processor)
        out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=5, do_sample=False)
        assert answer == processor.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
