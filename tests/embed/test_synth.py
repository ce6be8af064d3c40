"""The demo world: deterministic, a language prior, held-out images kept apart, balanced POPE probes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from misp_dpo.config import to_dict
from misp_dpo.embed import synth
from misp_dpo.embed import synth_world as world
from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
from misp_dpo.pipelines.runtime.validate import validate_output
from misp_dpo.pipelines.stages.synth import SynthConfig, SynthStage
from tests.embed.runs import output_files


def _synth(out: Path, n: int, seed: int) -> dict[str, str]:
    run_stage(SynthStage(), SynthConfig(out=out, n=n, heldout=4, seed=seed), RunOptions())
    return output_files(out)


def test_same_seed_same_bytes_other_seed_other_corpus(tmp_path: Path) -> None:
    first = _synth(tmp_path / "a", 30, seed=7)
    assert len([name for name in first if name.startswith("images/")]) == 30
    assert len([name for name in first if name.startswith("heldout/0")]) == 4
    assert _synth(tmp_path / "b", 30, seed=7) == first  # every image, table and the manifest
    other = _synth(tmp_path / "c", 30, seed=8)
    assert other["pairs.parquet"] != first["pairs.parquet"]
    assert sum(other[name] != first[name] for name in first if name.startswith("images/")) >= 25


def test_a_world_drawn_with_other_usual_values_is_not_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from misp_dpo.errors import OutputMadeOtherwise
    from misp_dpo.pipelines.stages import synth as stage

    def draw(prior: float) -> None:
        cfg = SynthConfig(out=tmp_path / str(prior), n=20, heldout=2, prior=prior)
        run_stage(SynthStage(), cfg, RunOptions())

    draw(0.7)
    draw(0.0)
    circle = {**world.USUAL["circle"], "color": ("purple", "green")}
    monkeypatch.setattr(stage, "USUAL", {**world.USUAL, "circle": circle})
    with pytest.raises(OutputMadeOtherwise, match="another config or inputs"):
        draw(0.7)  # the folder holds another world
    draw(0.0)  # no prior draws no usual value: the folder is the same world and resumes


def test_tables_and_attributes(synth_corpus: Path) -> None:
    assert validate_output(synth_corpus)[0] == []
    pairs = pq.read_table(synth_corpus / "pairs.parquet")
    attributes = pq.read_table(synth_corpus / "attributes.parquet")
    assert pairs.column_names == ["id", "prompt", "chosen", "rejected", "image"]
    assert attributes.column_names == ["image", *synth.ATTRIBUTES]
    assert len(synth.ATTRIBUTES) >= 5 and all(len(v) >= 2 for v in synth.ATTRIBUTES.values())
    assert attributes.column("image").equals(pairs.column("image"))
    assert all((synth_corpus / path).is_file() for path in pairs.column("image").to_pylist())
    for name, values in synth.ATTRIBUTES.items():  # 240 images cover every value of every attribute
        assert set(attributes.column(name).to_pylist()) == set(values), name
    assert len(set(pairs.column("prompt").to_pylist())) == len(synth.QUESTIONS)


def test_images_sharing_every_attribute_still_differ() -> None:
    rng = np.random.default_rng(0)
    for attrs in synth.draw_attributes(20, rng):
        twins = [synth.make_item(attrs, rng) for _ in range(4)]
        assert len({item.png for item in twins}) == 4, attrs  # offset, size and rotation jitter
        assert {item.caption for item in twins} == {synth.caption(attrs)}


def test_heldout_files_apart_from_the_corpus(synth_corpus: Path) -> None:
    def sha1s(folder: str) -> set[str]:
        return {hashlib.sha1(p.read_bytes()).hexdigest() for p in (synth_corpus / folder).iterdir()}

    assert sha1s("images").isdisjoint(sha1s("heldout"))
    held = pq.read_table(synth_corpus / "heldout_attributes.parquet")
    assert held.column_names == ["image", *synth.ATTRIBUTES]
    files = sorted(f"heldout/{p.name}" for p in (synth_corpus / "heldout").iterdir())
    assert sorted(held.column("image").to_pylist()) == files
    truth = {row["image"]: row for row in held.to_pylist()}
    probes = pq.read_table(synth_corpus / "probes.parquet").to_pylist()
    assert [k for k in probes[0]] == ["image", "question", "label", "category", "attribute", "id"]
    assert len({p["id"] for p in probes}) == len(probes)
    for split in world.SPLITS:
        labels = [p["label"] for p in probes if p["category"] == split]
        assert labels.count("yes") == labels.count("no") == 5 * 200  # 200 held-out images
    for p in probes:
        true_question = synth.question(p["attribute"], truth[p["image"]][p["attribute"]])
        assert (p["question"] == true_question) == (p["label"] == "yes"), p
    pairs = pq.read_table(synth_corpus / "heldout_pairs.parquet").to_pylist()
    assert {p["image"] for p in pairs} == {p["image"] for p in probes}
    for pair in pairs:
        differ = [_differs(truth[pair["image"]], truth[n]) for n in pair["negatives"]]
        assert differ == [[kind] for kind in pair["negative_kinds"]]
        assert pair["negative_kinds"] == list(synth.ATTRIBUTES)
    stats = json.loads((synth_corpus / "manifest.json").read_text())["stats"]
    assert stats["probes_adversarial"] == 2000 and stats["splits_coincide_all_size"] == 200


# --- the demo world: prior, probes, held-out images (misp_dpo.embed.synth_world) ---------------


def _rows(n: int, prior: float, seed: int = 0) -> list[dict[str, str]]:
    return world.draw(n, prior, np.random.default_rng(seed))


def _usual_share(rows: list[dict[str, str]], attribute: str) -> float:
    return float(np.mean([r[attribute] in world.USUAL[r["shape"]][attribute] for r in rows]))


@pytest.mark.parametrize("prior", [0.0, 0.4, 0.7, 1.0])
def test_prior_strength_shows_in_cooccurrence_counts(prior: float) -> None:
    rows = _rows(4000, prior)
    for attribute in world.PRIOR_ATTRIBUTES:  # P one of two usual values, else uniform over 4 or 5
        expected = prior + (1 - prior) * 2 / len(synth.ATTRIBUTES[attribute])
        assert abs(_usual_share(rows, attribute) - expected) < 0.025, (attribute, prior)
    cooc = world.Cooccurrence(rows)
    circles = cooc.counts["shape", "circle"]
    assert sum(cooc.pairs["color", v, "shape", "circle"] for v in synth.ATTRIBUTES["color"]) == circles
    red = cooc.pairs["color", "red", "shape", "circle"] / circles
    assert abs(red - (prior / 2 + (1 - prior) / 5)) < 0.05  # one of the circle's two usual colours
    sizes = [cooc.counts["size", v] for v in synth.ATTRIBUTES["size"]]  # the prior leaves size alone
    assert sizes == [2000, 2000]


def test_prior_zero_draws_the_corpus_of_before_the_prior() -> None:
    old, new = np.random.default_rng(5), np.random.default_rng(5)
    assert world.draw(900, 0.0, new) == synth.draw_attributes(900, old)
    assert new.random() == old.random()  # nothing more drawn: what follows is unchanged too
    cfg = world.WorldConfig(n=40, prior=0.0, heldout=3)
    made = world.make_world(cfg, np.random.default_rng(5))
    rng = np.random.default_rng(5)
    before = [(synth.make_item(a, rng), synth.make_pair(a, rng)) for a in synth.draw_attributes(40, rng)]
    assert [item.png for item in made.corpus] == [item.png for item, _ in before]
    assert made.pairs == [pair for _, pair in before]


def test_popular_is_the_most_frequent_absent_value() -> None:
    cooc = world.Cooccurrence(_rows(4000, 0.7))
    blue = {
        "shape": "square",
        "color": "blue",
        "size": "small",
        "position": "bottom left",
        "background": "gray",
    }
    assert cooc.popular(blue, "color") == "red"  # a usual colour of three shapes
    assert cooc.popular({**blue, "color": "red"}, "color") != "red"
    assert cooc.popular(blue, "position") == "top left" and cooc.popular(blue, "background") == "white"
    assert cooc.popular(blue, "size") == "large"


def _every_value_of_every_shape(
    base: dict[str, str],
) -> Iterator[tuple[dict[str, str], str, tuple[str, ...]]]:
    """`base` made each shape with each value of each prior attribute: (image, attribute, the shape's
    usual values of it)."""
    for shape, usual in world.USUAL.items():
        for attribute, values in usual.items():
            for present in synth.ATTRIBUTES[attribute]:
                yield {**base, "shape": shape, attribute: present}, attribute, values


def test_adversarial_picks_a_usual_value_of_the_shape() -> None:
    cooc = world.Cooccurrence(_rows(4000, 0.7))
    base = {
        "shape": "circle",
        "color": "purple",
        "size": "small",
        "position": "top left",
        "background": "black",
    }
    for attrs, attribute, values in _every_value_of_every_shape(base):
        picked = cooc.adversarial(attrs, attribute)
        # two usual values and one present: one is always absent, and it is asked
        assert picked != attrs[attribute] and picked in values, (attrs, attribute, picked)
    # the shape: the one whose usual colour, position and background are in the image
    squareish = {
        "shape": "circle",
        "color": "blue",
        "size": "large",
        "position": "bottom right",
        "background": "gray",
    }
    assert cooc.adversarial(squareish, "shape") == "square"
    assert cooc.adversarial(squareish, "size") == "small"
    assert cooc.prior_value("star", "background") in ("black", "white")


def test_prior_guesses_are_the_usual_values_the_image_lacks() -> None:
    cooc = world.Cooccurrence(_rows(4000, 0.7))
    circle = {
        "shape": "circle",
        "color": "blue",
        "size": "small",
        "position": "top left",
        "background": "black",
    }
    assert cooc.prior_guesses(circle, "color") == ("red", "yellow")  # a blue circle: either
    assert cooc.prior_guesses({**circle, "color": "yellow"}, "color") == ("red",)
    assert cooc.prior_guesses(circle, "position") == ("bottom right",)  # the other usual place
    assert cooc.prior_guesses(circle, "background") == ("white", "gray")
    assert cooc.prior_guesses(circle, "size") == () and cooc.prior_guesses(circle, "shape") == ()
    for prior in (0.5, 0.7):  # every shape's usual values are found, and nothing else
        found = world.Cooccurrence(_rows(4000, prior, seed=3))
        for attrs, attribute, values in _every_value_of_every_shape(circle):
            guesses = found.prior_guesses(attrs, attribute)
            assert set(guesses) == set(values) - {attrs[attribute]}, (prior, attrs, attribute)
    for n in (300, 4000):  # without a prior, sampling noise is no usual value
        noise = world.Cooccurrence(synth.draw_attributes(n, np.random.default_rng(n)))
        shapes, attributes = world.USUAL, world.PRIOR_ATTRIBUTES
        assert all(noise.prior_guesses({**circle, "shape": s}, a) == () for s in shapes for a in attributes)


def _probes(n: int = 60, prior: float = 0.7) -> tuple[list[dict[str, str]], list[world.Probe]]:
    rows = _rows(n, prior, seed=1)
    return rows, world.probes(rows, world.Cooccurrence(_rows(2000, prior)), np.random.default_rng(2))


def test_probes_balanced_per_split_image_and_attribute() -> None:
    rows, probes = _probes()
    assert len(probes) == len(world.SPLITS) * len(rows) * 2 * len(synth.ATTRIBUTES)
    groups: dict[tuple[str, int, str], list[world.Probe]] = {}
    for p in probes:
        groups.setdefault((p.split, p.image, p.attribute), []).append(p)
    assert len(groups) == len(world.SPLITS) * len(rows) * len(synth.ATTRIBUTES)
    for (_, image, attribute), pair in groups.items():  # one yes and one no per attribute
        assert sorted(p.label for p in pair) == ["no", "yes"]
        truth = rows[image][attribute]
        for p in pair:
            asked = [v for v in synth.ATTRIBUTES[attribute] if synth.question(attribute, v) == p.question]
            assert len(asked) == 1 and (asked[0] == truth) == (p.label == "yes"), p


def test_each_split_draws_its_absent_values_its_own_way() -> None:
    rows, probes = _probes(200)
    cooc = world.Cooccurrence(_rows(2000, 0.7))
    for p in probes:
        if p.label == "no" and p.split != "random":
            pick = cooc.popular if p.split == "popular" else cooc.adversarial
            assert p.question == synth.question(p.attribute, pick(rows[p.image], p.attribute))
    random_colours = {p.question for p in probes if p.split == "random" and p.attribute == "color"}
    assert len(random_colours) == 5  # uniform: every colour is asked about somewhere


def test_splits_coincide_counts_a_handmade_case() -> None:
    def probe(image: int, split: str, attribute: str, value: str, label: str = "no") -> world.Probe:
        return world.Probe(image, split, attribute, synth.question(attribute, value), label)

    probes = [
        *(probe(0, s, "size", "large") for s in world.SPLITS),  # two-valued: the same in every split
        *(probe(0, s, "size", "small", "yes") for s in world.SPLITS),  # yes questions do not count
        probe(0, "random", "color", "blue"),
        probe(0, "popular", "color", "red"),
        probe(0, "adversarial", "color", "red"),
        probe(1, "random", "color", "red"),  # another image: never the same question
        probe(1, "popular", "color", "green"),
        probe(1, "adversarial", "color", "blue"),
        probe(1, "random", "shape", "star"),
        probe(1, "popular", "shape", "star"),
        probe(1, "adversarial", "shape", "cross"),
    ]
    assert world.splits_coincide(probes) == {
        "random_popular": 2,
        "random_adversarial": 1,
        "popular_adversarial": 2,
        "all": 1,
        "all_shape": 0,
        "all_color": 0,
        "all_size": 1,
        "all_position": 0,
        "all_background": 0,
    }


def test_question_and_answer_wording() -> None:
    assert synth.question("shape", "star") == "Is there a star in the image?"
    assert synth.question("color", "red") == "Is the shape red?"
    assert synth.question("size", "small") == "Is the shape small?"
    assert synth.question("position", "top left") == "Is the shape at the top left?"
    assert synth.question("background", "striped") == "Is the background striped?"
    assert (synth.answer(True), synth.answer(False)) == ("Yes", "No")


def _differs(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return [name for name in synth.ATTRIBUTES if a[name] != b[name]]


def test_heldout_negatives_reuse_a_twin_else_render_one() -> None:
    base = {"shape": "star", "color": "red", "size": "small", "position": "top left", "background": "white"}
    rows = [base, {**base, "color": "blue"}, {**base, "color": "green"}, {**base, "size": "large"}]
    picks, extra = world.heldout_negatives(rows, np.random.default_rng(0))
    assert picks[0][:3] == (len(rows), 1, 3)  # shape: rendered; colour: the first twin; size: row 3
    assert picks[1][1] == 0 and picks[3][2] == 0
    everything = rows + extra
    for i, row in enumerate(picks):
        for name, j in zip(synth.ATTRIBUTES, row, strict=True):
            assert _differs(rows[i], everything[j]) == [name]


def test_uniform_heldout_scenes_break_the_prior_and_leave_the_corpus_as_it_was() -> None:
    cfg = world.WorldConfig(n=300, prior=0.7, heldout=200)
    usual = world.make_world(cfg, np.random.default_rng(1))
    uniform = world.make_world(replace(cfg, heldout_scenes="uniform"), np.random.default_rng(1))
    assert uniform.corpus == usual.corpus and uniform.pairs == usual.pairs

    def usual_share(made: world.World) -> float:
        rows = [item.attributes for item in made.heldout[: made.probed]]
        return float(np.mean([r["color"] in world.USUAL[r["shape"]]["color"] for r in rows]))

    assert usual_share(usual) > 0.75 and usual_share(uniform) < 0.5  # P(usual) 0.82 vs 0.4
    # the default is how held-out scenes were always drawn: worlds made before keep their config hash
    assert "heldout_scenes" not in to_dict(cfg, hashed_only=True)
    assert to_dict(replace(cfg, heldout_scenes="uniform"), hashed_only=True)["heldout_scenes"] == "uniform"


def test_world_heldout_apart_from_corpus_and_pairs_from_the_prior() -> None:
    cfg = world.WorldConfig(n=300, prior=0.7, heldout=30)
    made = world.make_world(cfg, np.random.default_rng(4))
    assert made == world.make_world(cfg, np.random.default_rng(4))  # deterministic for a seed
    corpus = {hashlib.sha1(item.png).hexdigest() for item in made.corpus}
    heldout = [hashlib.sha1(item.png).hexdigest() for item in made.heldout]
    assert corpus.isdisjoint(heldout) and len(set(heldout)) == len(heldout)
    assert made.probed == 30 and len(made.heldout_pairs) == 30
    assert len(made.heldout) == 30 + made.stats["heldout_negatives_rendered"]
    for pair in made.heldout_pairs:
        positive = made.heldout[pair.image].attributes
        assert [_differs(positive, made.heldout[j].attributes) for j in pair.negatives] == [
            [name] for name in synth.ATTRIBUTES
        ]
    cooc = world.Cooccurrence([item.attributes for item in made.corpus])
    for shape, usual in world.USUAL.items():  # the prior's description takes one of the usual values
        assert all(cooc.prior_value(shape, a) in values for a, values in usual.items())
    for item, (prompt, chosen, rejected) in zip(made.corpus, made.pairs, strict=True):
        truth = item.attributes
        focus = dict(synth.QUESTIONS)[prompt]
        assert chosen == synth.response(truth, focus)
        if focus is not None:  # the prior's wrong answer to the question
            assert rejected == synth.response({**truth, focus: cooc.adversarial(truth, focus)}, focus)
            continue
        prior = {**truth, **{a: cooc.prior_value(truth["shape"], a) for a in world.PRIOR_ATTRIBUTES}}
        if prior != truth:  # the prior's values where they differ
            assert rejected == synth.response(prior, None), (truth, rejected)
        else:
            assert len([r for r in _wrong_by_one(truth) if synth.response(r, None) == rejected]) == 1


def _wrong_by_one(truth: dict[str, str]) -> list[dict[str, str]]:
    return [{**truth, n: v} for n, values in synth.ATTRIBUTES.items() for v in values if v != truth[n]]
