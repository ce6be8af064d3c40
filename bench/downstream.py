"""Downstream benchmark: the paper's table in miniature on the demo world (issue 13, docs/method.md).

    .venv/bin/python bench/downstream.py                  # the core table, 3 seeds (see --help)
    .venv/bin/python bench/downstream.py --arms misp,misp-topk,misp-is,misp-l,misp-v,misp-bdiv0,n1,n5
    .venv/bin/python bench/downstream.py --quick          # a smoke run: 1 seed, tiny sizes, few steps

Per seed S, cached under ROOT/runs/downstream/seed<S>/ (a rerun only redoes what is missing):
the demo pipeline's synth -> fit-clip -> embed -> candidates -> sae stages (configs/demo.toml, every
one seeded S, run in-process through the runner), one base VLM (the fitted demo VLM of `fit-vlm`,
`--base` naming a folder per seed, or `--model tiny`), then per arm: its negatives (the `mine` stage
with the arm's settings, or corrupted copies of the positive), one LoRA adapter trained through the
train core with the SAME number of optimiser steps on the SAME pairs (the first steps x batch pairs
of a seeded permutation), and one evaluation (the eval core): POPE random/popular/adversarial on the
held-out probes (--probes per split) and preference accuracy on heldout_pairs.parquet, on each
--heldout set: `world` (held-out scenes drawn like the corpus, with the prior) and `uniform` (the
same world, its held-out scenes drawn without the prior, so most break it somewhere: where a model
naming things from what usually co-occurs fails; `synth --heldout-scenes uniform`). Everything
mined and trained is the same for both; each gets its own table.

Arms (the default is `misp`, mine's config in configs/demo.toml):
  core: misp, maxmin, nearest, random, n1 (the single best misp negative), corrupt (one negative: the
        positive cropped to 1-20% of its area as mDPO's RandomResizedCrop, or --corrupt noise),
        text (text-only DPO: image-term weight 0)
  ablations: misp-topk (TopK SAE), misp-is (importance sampling, M = 1 of N = 3, the dataset's q),
        misp-is-fitted (the same with the fitted proposal q_phi, `train --proposal fitted`), misp-l and misp-v
        (score weights 1,0 and 0,1), misp-bdiv0 (beta_div 0), n5 (N = 5); n1 and misp give N = 1, 3;
        oracle (no mining: per pair as many corpus images as misp's, each differing from the positive
        in one attribute, each in another one, from the world's ground truth: what mining could give)
  base: the untrained base model (always evaluated, shown as a row)

Differences against misp are paired (same seed, same probes): per probe arm-correct minus
misp-correct; the 95% interval resamples seeds, then probes within seed (misp_dpo.eval.paired).
Writes bench/results/downstream/downstream.json and downstream.png and prints the wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality import replace_deep  # noqa: E402

from misp_dpo.errors import OutputMadeOtherwise  # noqa: E402
from misp_dpo.eval.paired import PairedDiff, paired_difference  # noqa: E402
from misp_dpo.log import configure_logging  # noqa: E402

SPLITS = ("random", "popular", "adversarial")
DEFAULT = "misp"
CORE = ("misp", "maxmin", "nearest", "random", "n1", "corrupt", "text")
ABLATIONS = ("misp-topk", "misp-is", "misp-is-fitted", "misp-l", "misp-v", "misp-bdiv0", "n5", "oracle")


@dataclasses.dataclass(frozen=True)
class Arm:
    """How one arm mines (changes to the demo's mine config, or `corrupt`) and trains."""

    name: str
    mine: dict[str, Any] | None  # None: reuse the default arm's negatives
    train: dict[str, Any] = dataclasses.field(default_factory=dict)  # LossConfig / LoopConfig changes
    corrupt: bool = False
    oracle: bool = False  # ground-truth negatives from the world's attributes instead of mining
    sae: str = "paper"


ARMS: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm("misp", {}),
        Arm("maxmin", {"strategy": "maxmin"}),
        Arm("nearest", {"strategy": "nearest"}),
        Arm("random", {"strategy": "random"}),
        Arm("n1", {"negatives": 1}),
        Arm("corrupt", None, corrupt=True),
        Arm("text", None, {"image_weight": 0.0}),
        Arm("misp-topk", {}, sae="topk"),
        Arm("misp-is", None, {"sample_negatives": 1}),
        Arm("misp-is-fitted", None, {"sample_negatives": 1, "proposal": "fitted"}),
        Arm("misp-l", {"weights": (1.0, 0.0)}),
        Arm("misp-v", {"weights": (0.0, 1.0)}),
        Arm("misp-bdiv0", {"beta_div": 0.0}),
        Arm("n5", {"negatives": 5}),
        Arm("oracle", None, oracle=True),
    )
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    n: int | None  # corpus size (None: the demo's)
    heldout: int | None
    clip_steps: int | None
    sae_epochs: int | None
    steps: int
    batch: int
    probes: int  # per split
    pairs: int  # held-out preference pairs (0: all)
    vlm_steps: tuple[int, int] | None = None  # fit-vlm (tower_steps, steps); None: fit-vlm's defaults


# Sized for about 90 minutes on 2 idle cores (estimated, per seed: world 5 min, fit-vlm <= 10, mining 1.5,
# 7 trainings of 100 steps x 4 pairs ~0.4 s a step + reference pass ~7, 8 evaluations of 4,500 probes and
# 200 held-out pairs ~8); --base with already fitted VLMs saves the fit.
FULL = Sizes(n=None, heldout=None, clip_steps=None, sae_epochs=None, steps=100, batch=4, probes=1500, pairs=0)
QUICK = Sizes(
    n=400, heldout=20, clip_steps=40, sae_epochs=2, steps=6, batch=2, probes=60, pairs=30, vlm_steps=(30, 60)
)


class Clock:
    """Seconds spent per phase, summed over seeds and arms."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    def add(self, phase: str, started: float) -> None:
        self.spent[phase] = self.spent.get(phase, 0.0) + time.perf_counter() - started


# ---------------------------------------------------------------------------------------------- world


def demo_stages(root: Path) -> dict[str, tuple[Any, Any, Any]]:
    from misp_dpo.pipelines.runtime.pipeline_file import load_pipeline
    from misp_dpo.pipelines.stages import STAGES

    return {s.name: (s, c, o) for s, c, o in load_pipeline(ROOT / "configs/demo.toml", STAGES, str(root))}


def prepare(root: Path, seed: int, sizes: Sizes, saes: set[str], stages: dict[str, Any]) -> None:
    """synth -> fit-clip -> embed -> candidates -> sae (each variant in `saes`), seeded; the runner
    skips what is complete."""
    for name in ("synth", "fit-clip", "embed", "candidates"):
        stage, cfg, opts = stages[name]
        changes: dict[str, Any] = synth_changes(seed, sizes) if name == "synth" else {"seed": seed}
        if name == "fit-clip" and sizes.clip_steps:
            changes["steps"] = sizes.clip_steps
        run_cached(stage, replace_deep(cfg, **changes), opts)
    stage, cfg, opts = stages["sae"]
    for variant in sorted(saes):
        changes = {"seed": seed, "out": sae_dir(root, variant), "variant": variant}
        if sizes.sae_epochs:
            changes["epochs"] = sizes.sae_epochs
        run_cached(stage, replace_deep(cfg, **changes), opts)


def run_cached(stage: Any, cfg: Any, opts: Any) -> None:
    """A stage into this benchmark's cache: skipped when complete with the same settings, replaced
    when an earlier run made it with others (after a default changed, or another arm's settings),
    where the runner would stop and ask for --overwrite."""
    from misp_dpo.pipelines.runtime.runner import run_stage

    try:
        run_stage(stage, cfg, opts)
    except OutputMadeOtherwise:
        run_stage(stage, cfg, dataclasses.replace(opts, overwrite=True))


def synth_changes(seed: int, sizes: Sizes) -> dict[str, Any]:
    return {"seed": seed, **{k: v for k, v in (("n", sizes.n), ("heldout", sizes.heldout)) if v}}


def sae_dir(root: Path, variant: str) -> Path:
    return root / "sae" if variant == "paper" else root / f"sae-{variant}"


def base_model(args: argparse.Namespace, root: Path, seed: int, sizes: Sizes) -> str:
    """The model spec every arm of this seed starts from: tiny, --base's folder, or the demo VLM
    fitted on this seed's corpus (built through fit-vlm when missing)."""
    if args.model == "tiny":
        return "tiny"
    if args.base:
        folder = Path(args.base.format(seed=seed))
        if not (folder / "config.json").is_file():
            raise SystemExit(
                f"--base {folder}: no config.json (a fitted VLM folder per seed; {{seed}} expands)"
            )
        return str(folder.resolve())
    folder = root / "vlm"
    fit_base(root, folder, seed, sizes.vlm_steps)  # skipped when complete with the same settings
    return str(folder.resolve())


def fit_base(root: Path, folder: Path, seed: int, steps: tuple[int, int] | None) -> None:
    """The demo VLM on this seed's synth corpus: the `fit-vlm` stage when registered, else its core."""
    from misp_dpo.pipelines.stages import STAGES

    if "fit-vlm" in STAGES:
        from misp_dpo.pipelines.runtime.runner import RunOptions

        stage = STAGES["fit-vlm"]
        names = {f.name for f in dataclasses.fields(stage.config)}
        given: dict[str, Any] = {"corpus": root / "synth", "clip": root / "clip", "out": folder, "seed": seed}
        if steps is not None:
            given |= {"tower_steps": steps[0], "steps": steps[1]}
        run_cached(stage, stage.config(**{k: v for k, v in given.items() if k in names}), RunOptions())
        return
    from misp_dpo.embed import synth
    from misp_dpo.eval.fit_vlm import FitVlmConfig, clip_teacher, fit_vlm, read_corpus, save_vlm

    cfg = FitVlmConfig(seed=seed)
    if steps is not None:
        cfg = dataclasses.replace(cfg, tower_steps=steps[0], steps=steps[1])
    data = read_corpus(root / "synth")
    teacher = clip_teacher(root / "clip", data.pixels, synth.IMAGE_SIZE // cfg.patch_size)
    save_vlm(fit_vlm(data, cfg, teacher), folder)


# -------------------------------------------------------------------------------------------- negatives


def _selection_defaults() -> dict[str, Any]:
    from misp_dpo.mining.strategies import SelectionParams

    return {f.name: f.default for f in dataclasses.fields(SelectionParams)}


def mine_arm(root: Path, seed: int, arm: Arm, stages: dict[str, Any]) -> Path:
    """The arm's `negatives/` folder (the mine stage with the arm's settings; cached by the runner)."""
    from misp_dpo.mining.strategies import USED_BY

    defaults = _selection_defaults()
    stage, cfg, opts = stages["mine"]
    out = root / f"negatives-{arm.name}"
    changes = {**(arm.mine or {}), "seed": seed, "out": out, "sae": sae_dir(root, arm.sae)}
    strategy = changes.get("strategy", "misp")
    for name, users in USED_BY.items():  # the demo's misp-only settings (relevance) back to defaults
        if strategy not in users:
            changes[name] = defaults[name]
    run_cached(stage, replace_deep(cfg, **changes), opts)
    return out


def read_negatives(folder: Path) -> Any:
    """A mine output's rows with every uri made absolute (so a subset can live in another folder)."""
    import pyarrow as pa

    from misp_dpo.pipelines import schemas
    from misp_dpo.pipelines.io import read_table
    from misp_dpo.pipelines.manifest import read_manifest

    manifest = read_manifest(folder, "mine", "--negatives")
    rows = read_table(manifest.shard_paths(schemas.NEGATIVES_SHARD_PREFIX)).to_pylist()
    for row in rows:
        row["positive"]["uri"] = _absolute(row["positive"]["uri"], folder)
        for neg in row["negatives"]:
            neg["uri"] = _absolute(neg["uri"], folder)
    return pa.Table.from_pylist(rows, schema=schemas.NEGATIVES)


def _absolute(uri: str | None, folder: Path) -> str | None:
    if not uri or "://" in uri or Path(uri).is_absolute():
        return uri
    return str((folder / uri).resolve())


def training_pairs(table: Any, count: int, seed: int) -> list[str]:
    """The pair ids every arm of a seed trains on: the first `count` of a seeded permutation."""
    ids = sorted(table.column("pair_id").to_pylist())
    order = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[i] for i in order[: min(count, len(ids))])


def subset(table: Any, pair_ids: list[str]) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    table = table.filter(pc.is_in(table.column("pair_id"), pa.array(pair_ids)))
    return table.sort_by("pair_id")


def corrupt_negatives(table: Any, out: Path, kind: str, seed: int) -> Any:
    """One negative per pair: the positive image, cropped (RandomResizedCrop keeping 1-20% of the
    area, then resized back, as mDPO) or with Gaussian noise; each rendered to a PNG under `out`."""
    import io

    from PIL import Image

    from misp_dpo.image_uris import read_uri
    from misp_dpo.mining.selection import pair_seeds

    out.mkdir(parents=True, exist_ok=True)
    rows = table.to_pylist()
    seeds = pair_seeds([r["pair_id"] for r in rows], seed)
    for row, pair_seed in zip(rows, seeds, strict=True):
        path = out / f"{row['pair_id']}.png"
        if not path.is_file():
            image = Image.open(io.BytesIO(read_uri(row["positive"]["uri"]))).convert("RGB")
            corrupted = _corrupt(image, kind, np.random.default_rng(int(pair_seed)))
            tmp = path.with_suffix(".tmp.png")
            corrupted.save(tmp)
            tmp.replace(path)
        row["negatives"] = [unmined_negative(f"corrupt-{row['pair_id']}", str(path.resolve()), 0, 1.0)]
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=table.schema)


def unmined_negative(image_id: str, uri: str, rank: int, proposal: float) -> dict[str, Any]:
    """A negative for the trainer that no mining scored (every mined field of the schema empty)."""
    from misp_dpo.pipelines.schemas import NEGATIVE

    return {
        **dict.fromkeys(field.name for field in NEGATIVE),
        "image_id": image_id,
        "uri": uri,
        "rank": rank,
        "proposal": proposal,
    }


def oracle_negatives(table: Any, synth_dir: Path, seed: int) -> Any:
    """As many negatives per pair as the default arm's, each a corpus image that differs from the
    positive in exactly one attribute, each in another attribute type (drawn at random among those
    the corpus has a twin for): the minimal pairs that the held-out preference set measures, found
    from the ground truth instead of mined, so the ceiling of what mining can give on this world."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from misp_dpo.embed import synth
    from misp_dpo.mining.selection import pair_seeds

    names = list(synth.ATTRIBUTES)
    corpus = pq.read_table(synth_dir / "attributes.parquet").to_pylist()
    uris = [str((synth_dir / row["image"]).resolve()) for row in corpus]
    keys = [tuple(row[a] for a in names) for row in corpus]
    by_key: dict[tuple[str, ...], list[int]] = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    row_of = {uri: i for i, uri in enumerate(uris)}
    image_ids: dict[int, str] = {}
    rows = table.to_pylist()
    for row, pair_seed in zip(rows, pair_seeds([r["pair_id"] for r in rows], seed), strict=True):
        rng = np.random.default_rng(int(pair_seed))
        key = keys[row_of[str(Path(row["positive"]["uri"]).resolve())]]
        picks: list[int] = []
        for a in rng.permutation(len(names)):
            twins = [
                j
                for value in synth.ATTRIBUTES[names[a]]
                if value != key[a]
                for j in by_key.get((*key[:a], value, *key[a + 1 :]), [])
            ]
            if twins and len(picks) < len(row["negatives"]):
                picks.append(twins[int(rng.integers(len(twins)))])
        for j in picks:
            if j not in image_ids:  # each picked image read once, however many pairs pick it
                image_ids[j] = hashlib.sha1(Path(uris[j]).read_bytes()).hexdigest()
        row["negatives"] = [
            unmined_negative(image_ids[j], uris[j], rank, 1.0 / len(picks)) for rank, j in enumerate(picks)
        ]
    return pa.Table.from_pylist(rows, schema=table.schema)


def _corrupt(image: Any, kind: str, rng: np.random.Generator) -> Any:
    from PIL import Image

    w, h = image.size
    if kind == "noise":
        pixels = np.asarray(image, dtype=np.float32)
        noisy = pixels + rng.normal(0.0, 0.5 * 255.0, pixels.shape)
        return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    for _ in range(10):  # torchvision's RandomResizedCrop(scale=(0.01, 0.2), ratio=(3/4, 4/3))
        area = w * h * rng.uniform(0.01, 0.2)
        ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw, ch = round((area * ratio) ** 0.5), round((area / ratio) ** 0.5)
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return image.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BICUBIC)
    side = max(1, round(min(w, h) * 0.3))
    return image.crop((0, 0, side, side)).resize((w, h), Image.Resampling.BICUBIC)


# ----------------------------------------------------------------------------------------------- train


def train_arm(
    arm_dir: Path, table: Any, spec: str, seed: int, arm: Arm, sizes: Sizes, lr: float, stages: dict[str, Any]
) -> Path:
    """One LoRA adapter through the train core on `table` (cached: skipped when its settings match)."""
    from misp_dpo.dpo.distributed import from_env
    from misp_dpo.pipelines import schemas
    from misp_dpo.pipelines.io import write_table
    from misp_dpo.pipelines.stages.train import TrainWork, train_task

    settings = {
        "model": spec,
        "seed": seed,
        "steps": sizes.steps,
        "batch": sizes.batch,
        "lr": lr,
        "train": arm.train,
        "pairs": table.column("pair_id").to_pylist(),
        "negatives": [[n["image_id"] for n in ns] for ns in table.column("negatives").to_pylist()],
    }
    done = arm_dir / "done.json"
    adapter = arm_dir / "adapter"
    if (
        done.is_file()
        and json.loads(done.read_text()) == settings
        and (adapter / "adapter_config.json").is_file()
    ):
        return adapter
    if arm_dir.is_dir():  # another model, table or setting: start afresh (no stale checkpoint resumes)
        shutil.rmtree(arm_dir)
    data = arm_dir / "negatives"
    data.mkdir(parents=True, exist_ok=True)
    shard = data / f"{schemas.NEGATIVES_SHARD_PREFIX}-00000.parquet"
    write_table(table, shard, schemas.NEGATIVES)
    _, cfg, _ = stages["train"]
    changes = {
        "negatives": data,
        "model": spec,
        "out": arm_dir,
        "seed": seed,
        "max_steps": sizes.steps,
        "batch_size": sizes.batch,
        "lr": lr,
        "checkpoint_every": 10**9,
        "epochs": 1.0,
        **arm.train,
    }
    cfg = replace_deep(cfg, **changes)
    dataset = json.dumps(settings["negatives"])
    train_task(cfg, TrainWork(data, [shard], dataset), arm_dir, from_env())
    done.write_text(json.dumps(settings) + "\n")
    return adapter


# ------------------------------------------------------------------------------------------------ eval


def evaluate_arm(
    out: Path, spec: str, adapter: Path | None, seed: int, probes: Any, pairs: Any, sizes: Sizes
) -> dict[str, Any]:
    """POPE per split and preference accuracy of one model, with each probe's correctness (cached)."""
    from misp_dpo.eval.config import EvalConfig
    from misp_dpo.eval.evaluate import answer_probes, pope_report
    from misp_dpo.eval.models import load_base, load_trained, resolve_base

    key = {
        "version": 3,
        "model": spec,
        "adapter": _stamp(adapter),
        "probes": sizes.probes,
        "pairs": sizes.pairs,
    }
    if out.is_file():
        cached = json.loads(out.read_text())
        if cached.get("key") == key:
            return cached
    cfg = EvalConfig(batch_size=64, device="cpu")  # eval's defaults: 16 new tokens (reasoned answers)
    base = load_base(resolve_base(None, adapter) if adapter is not None else spec, cfg, seed)
    model = load_trained(base, adapter, cfg) if adapter is not None else base.model
    answers = answer_probes(model, base, probes, cfg, out.stem, show_progress=False)
    pope = pope_report(answers)
    preference, wins = preference_by_negative(model, base, pairs, cfg.batch_size)
    correct: dict[str, dict[str, bool]] = {s: {} for s in SPLITS}
    correct["image_accuracy"] = wins
    for row in answers.to_pylist():
        if row["parsed"] is not None:
            correct[row["split"]][row["id"]] = row["parsed"].lower() == row["label"].lower()
    record = {"key": key, "pope": pope, "preference": preference, "correct": correct}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(out)
    return record


def preference_by_negative(
    model: Any, base: Any, pairs: Any, batch: int
) -> tuple[dict[str, Any], dict[str, bool]]:
    """`preference_accuracy`'s figures, plus each (pair, negative)'s win (log p(chosen | positive) >
    log p(chosen | negative)), keyed pair_id/image_id, for the paired bootstrap."""
    from misp_dpo.eval.preference import score_pairs, summarise

    scores = score_pairs(model, base, pairs, batch, show_progress=False)
    wins: dict[str, bool] = {}
    ids = pairs.table.column("pair_id").to_pylist()
    negatives = pairs.table.column("negatives").to_pylist()
    for i, (pair_id, refs) in enumerate(zip(ids, negatives, strict=True)):
        for k, ref in enumerate(refs):
            if np.isfinite(scores.image[i, k]):
                wins[f"{pair_id}/{ref['image_id']}"] = bool(scores.image[i, k] > 0)
    return summarise(scores, pairs), wins


def _stamp(adapter: Path | None) -> str | None:
    """The adapter's identity for the eval cache: its weights' size and modification time."""
    if adapter is None:
        return None
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        return str(adapter)
    stat = weights.stat()
    return f"{adapter}:{stat.st_size}:{stat.st_mtime_ns}"


def held_out(synth: Path, sizes: Sizes) -> tuple[Any, Any]:
    from misp_dpo.eval.evaluate import limit_per_split
    from misp_dpo.eval.preference import load_preference_pairs
    from misp_dpo.eval.probes import load_probes

    probes = limit_per_split(load_probes([str(synth / "probes.parquet")]), sizes.probes)
    pairs = load_preference_pairs(synth / "heldout_pairs.parquet", None, sizes.pairs)
    return probes, pairs


# ------------------------------------------------------------------------------------------------ seed


def run_seed(
    args: argparse.Namespace, seed: int, arms: list[str], sizes: Sizes, clock: Clock
) -> dict[str, dict[str, Any]]:
    root = args.root / f"seed{seed}"
    stages = demo_stages(root)
    started = time.perf_counter()
    prepare(root, seed, sizes, {ARMS[a].sae for a in arms}, stages)
    clock.add("world (synth, clip, embed, candidates, sae)", started)
    started = time.perf_counter()
    spec = base_model(args, root, seed, sizes)
    clock.add("base VLM", started)
    sets = {
        scenes: held_out(heldout_synth(root, scenes, stages, seed, sizes), sizes) for scenes in args.heldout
    }
    results: dict[str, dict[str, dict[str, Any]]] = {scenes: {} for scenes in sets}

    def evaluate(name: str, adapter: Path | None) -> None:
        for scenes, (probes, pairs) in sets.items():
            out = root / ("eval" if scenes == "world" else f"eval-{scenes}") / f"{name}.json"
            results[scenes][name] = evaluate_arm(out, spec, adapter, seed, probes, pairs, sizes)

    started = time.perf_counter()
    evaluate("base", None)
    clock.add("eval", started)
    default_table = None
    chosen: list[str] = []
    for name in arms:
        arm = ARMS[name]
        started = time.perf_counter()
        if default_table is None:
            default_table = read_negatives(mine_arm(root, seed, ARMS[DEFAULT], stages))
            chosen = training_pairs(default_table, sizes.steps * sizes.batch, seed)
        if arm.corrupt:
            table = corrupt_negatives(
                subset(default_table, chosen), root / f"corrupt-{args.corrupt}", args.corrupt, seed
            )
        elif arm.oracle:
            table = oracle_negatives(subset(default_table, chosen), root / "synth", seed)
        elif arm.mine is None or name == DEFAULT:
            table = subset(default_table, chosen)
        else:
            table = subset(read_negatives(mine_arm(root, seed, arm, stages)), chosen)
        clock.add("mine", started)
        started = time.perf_counter()
        adapter = train_arm(root / f"train-{name}", table, spec, seed, arm, sizes, args.lr, stages)
        clock.add("train", started)
        trained = time.perf_counter() - started
        started = time.perf_counter()
        evaluate(name, adapter)
        clock.add("eval", started)
        took = f"train {trained:.0f} s, eval {time.perf_counter() - started:.0f} s"
        for scenes in sets:
            print(
                f"  seed {seed} {name:11s} {scenes:7s} {_brief(results[scenes][name])}  ({took})", flush=True
            )
    return results


def heldout_synth(root: Path, scenes: str, stages: dict[str, Any], seed: int, sizes: Sizes) -> Path:
    """The folder whose held-out probes and pairs are evaluated: the seed's synth output for
    `world` scenes, else the same world (same seed, so the same corpus) drawn again with other
    held-out scenes (`synth --heldout-scenes`), only its held-out files read."""
    if scenes == "world":
        return root / "synth"
    stage, cfg, opts = stages["synth"]
    out = root / f"synth-{scenes}"
    run_cached(stage, replace_deep(cfg, **synth_changes(seed, sizes), heldout_scenes=scenes, out=out), opts)
    return out


def _brief(record: dict[str, Any]) -> str:
    accs = " ".join(f"{s[:3]} {record['pope'][s]['accuracy']:.3f}" for s in SPLITS if s in record["pope"])
    img = (record.get("preference") or {}).get("image_accuracy")
    return f"{accs}  image-pref {img:.3f}" if img is not None else accs


# ----------------------------------------------------------------------------------------------- table


def summarise(per_seed: dict[int, dict[str, dict[str, Any]]], rows: list[str]) -> dict[str, Any]:
    """Mean metrics per arm and the paired differences against the default, per split."""
    seeds = sorted(per_seed)
    out: dict[str, Any] = {}
    for arm in rows:
        records = [per_seed[s][arm] for s in seeds]
        entry: dict[str, Any] = {"splits": {}, "diff": {}}
        for split in SPLITS:
            entry["splits"][split] = {
                key: float(np.mean([r["pope"][split][key] for r in records]))
                for key in ("accuracy", "yes_ratio", "f1")
            }
        images = [(r.get("preference") or {}).get("image_accuracy") for r in records]
        texts = [(r.get("preference") or {}).get("text_accuracy") for r in records]
        entry["image_accuracy"] = _mean(images)
        entry["text_accuracy"] = _mean(texts)
        if arm != DEFAULT:
            for split in SPLITS:
                d = paired_difference(
                    [per_seed[s][DEFAULT]["correct"][split] for s in seeds],
                    [per_seed[s][arm]["correct"][split] for s in seeds],
                )
                entry["diff"][split] = _diff_dict(d)
            if entry["image_accuracy"] is not None:
                d = paired_difference(
                    [per_seed[s][DEFAULT]["correct"]["image_accuracy"] for s in seeds],
                    [per_seed[s][arm]["correct"]["image_accuracy"] for s in seeds],
                )
                entry["diff"]["image_accuracy"] = _diff_dict(d)
        out[arm] = entry
    return out


def _mean(values: list[Any]) -> float | None:
    return None if any(v is None for v in values) else float(np.mean([float(v) for v in values]))


def _diff_dict(d: PairedDiff) -> dict[str, Any]:
    return {
        "mean": d.mean,
        "low": d.low,
        "high": d.high,
        "per_seed": list(d.per_seed),
        "signs": d.signs,
        "excludes_zero": d.excludes_zero,
    }


def print_table(summary: dict[str, Any], seeds: list[int], probes: dict[str, int]) -> list[str]:
    head = "".join(f" {s[:4]:>6s} acc  yes " for s in SPLITS)
    print(f"\nmean over seeds {seeds}; probes per split {probes}")
    print(f"{'arm':12s}{head} img-pref text-pref")
    for arm, e in summary.items():
        cells = "".join(
            f"  {e['splits'][s]['accuracy']:.3f} {e['splits'][s]['yes_ratio']:.2f}   " for s in SPLITS
        )
        img = "   n/a" if e["image_accuracy"] is None else f"{e['image_accuracy']:.3f}"
        txt = "   n/a" if e["text_accuracy"] is None else f"{e['text_accuracy']:.3f}"
        print(f"{arm:12s}{cells}   {img}     {txt}")
    print(
        f"\ndifferences against {DEFAULT} (arm - {DEFAULT}), paired, 95% interval "
        "(seeds then probes), per-seed signs"
    )
    print(f"{'arm':12s}" + "".join(f"{s:>31s}" for s in (*SPLITS, "image_accuracy")))
    excluding: list[str] = []
    for arm, e in summary.items():
        if arm == DEFAULT:
            continue
        row: list[str] = []
        for key in (*SPLITS, "image_accuracy"):
            d = e["diff"].get(key)
            if d is None:
                row.append(f"{'n/a':>31s}")
                continue
            mark = "*" if d["excludes_zero"] else " "
            row.append(f"{d['mean']:+.3f} [{d['low']:+.3f},{d['high']:+.3f}]{mark} {d['signs']:>4s}")
            if d["excludes_zero"] and key in SPLITS:
                side = "above" if d["mean"] > 0 else "below"
                excluding.append(
                    f"{arm} {side} {DEFAULT} on {key} ({d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}])"
                )
        print(f"{arm:12s}" + "".join(f"{c:>31s}" for c in row))
    print(
        "(* the interval excludes 0; image_accuracy: held-out (pair, negative) wins, resampled like probes)"
    )
    print(
        "\nintervals that exclude 0 (POPE):"
        if excluding
        else "\nno POPE difference has an interval that excludes 0"
    )
    for line in excluding:
        print("  " + line)
    return excluding


def plot(summary: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in summary if a != DEFAULT]
    panels = [k for k in (*SPLITS, "image_accuracy") if all(k in summary[a]["diff"] for a in arms)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 0.45 * len(arms) + 2), sharey=True)
    y = np.arange(len(arms))
    for ax, split in zip(axes, panels, strict=True):
        d = [summary[a]["diff"][split] for a in arms]
        means = np.array([x["mean"] for x in d])
        err = np.array([[x["mean"] - x["low"] for x in d], [x["high"] - x["mean"] for x in d]])
        colours = [
            "tab:red"
            if x["excludes_zero"] and x["mean"] < 0
            else "tab:green"
            if x["excludes_zero"]
            else "tab:grey"
            for x in d
        ]
        for yi in range(len(arms)):
            ax.errorbar(means[yi], y[yi], xerr=err[:, yi : yi + 1], fmt="none", ecolor=colours[yi], capsize=3)
        ax.scatter(means, y, c=colours, zorder=3)
        for row, x in enumerate(d):
            ax.annotate(x["signs"], (x["high"], row), xytext=(4, -3), textcoords="offset points", fontsize=8)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(f"POPE {split}" if split in SPLITS else "held-out preference (image)")
        ax.set_xlabel(f"accuracy, arm - {DEFAULT} (95% CI; seed signs)")
    axes[0].set_yticks(y, arms)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="0,1,2", help="world seeds (one world, CLIP, SAE, base VLM each)")
    parser.add_argument("--arms", default=",".join(CORE), help=f"arms; ablations: {','.join(ABLATIONS)}")
    parser.add_argument(
        "--root", type=Path, default=None, help="cache of the per-seed worlds (default runs/downstream)"
    )
    parser.add_argument("--out", type=Path, default=None, help="folder of downstream.json and downstream.png")
    parser.add_argument(
        "--model",
        choices=("fitted", "tiny"),
        default="fitted",
        help="base VLM: the fitted demo VLM or tiny (random, cannot see)",
    )
    parser.add_argument(
        "--base", default="", help="a fitted VLM folder per seed, {seed} expands (default: fit one per seed)"
    )
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps of every arm")
    parser.add_argument("--batch", type=int, default=None, help="pairs per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak LoRA learning rate of every arm")
    parser.add_argument("--probes", type=int, default=None, help="POPE probes per split (held-out)")
    parser.add_argument(
        "--corrupt", choices=("crop", "noise"), default="crop", help="the corrupted-image negative"
    )
    parser.add_argument(
        "--heldout",
        default="world,uniform",
        help="held-out sets each arm is evaluated on: world (drawn like the corpus, with the prior) and "
        "uniform (the same world's held-out scenes drawn without it, so most break it: synth "
        "--heldout-scenes); one table each",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 seed, tiny sizes, few steps (a barely fitted VLM)"
    )
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    changes = {k: v for k, v in (("steps", args.steps), ("batch", args.batch), ("probes", args.probes)) if v}
    sizes = dataclasses.replace(sizes, **changes)
    if args.quick:
        args.seeds = args.seeds if args.seeds != "0,1,2" else "0"
    args.root = args.root or ROOT / ("runs/downstream-quick" if args.quick else "runs/downstream")
    args.out = args.out or ROOT / (
        "bench/results/downstream-quick" if args.quick else "bench/results/downstream"
    )
    arms = list(dict.fromkeys([DEFAULT, *(a.strip() for a in args.arms.split(",") if a.strip())]))
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; known: {', '.join(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.heldout = [h.strip() for h in args.heldout.split(",") if h.strip()]
    if not args.heldout or set(args.heldout) - {"world", "uniform"}:
        raise SystemExit(f"--heldout: world and/or uniform, got {args.heldout}")
    configure_logging("json")
    logging.getLogger("misp_dpo").setLevel(logging.WARNING)
    started = time.perf_counter()
    clock = Clock()
    per_seed = {}
    for seed in seeds:
        t0 = time.perf_counter()
        per_seed[seed] = run_seed(args, seed, arms, sizes, clock)
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    rows = ["base", *arms]
    summary, excluding = {}, {}
    for scenes in args.heldout:
        of_scenes = {seed: results[scenes] for seed, results in per_seed.items()}
        summary[scenes] = summarise(of_scenes, rows)
        first = of_scenes[seeds[0]][DEFAULT]["pope"]
        probes = {s: first[s]["n"] for s in SPLITS if s in first}
        print(f"\n=== held-out scenes: {scenes}")
        excluding[scenes] = print_table(summary[scenes], seeds, probes)
    wall = time.perf_counter() - started
    title = (
        f"downstream: {args.model} base, {len(seeds)} seed(s), {sizes.steps} steps x {sizes.batch} "
        f"pairs, {sizes.probes} probes/split"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "settings": {
            **dataclasses.asdict(sizes),
            "model": args.model,
            "base": args.base,
            "lr": args.lr,
            "corrupt": args.corrupt,
            "seeds": seeds,
            "arms": arms,
            "default": DEFAULT,
            "heldout": args.heldout,
        },
        "summary": summary,
        "per_seed": {
            str(s): {
                scenes: {a: {k: v for k, v in r.items() if k != "correct"} for a, r in arms_.items()}
                for scenes, arms_ in res.items()
            }
            for s, res in per_seed.items()
        },
        "excluding_zero": excluding,
        "seconds": {"wall": wall, **clock.spent},
    }
    (args.out / "downstream.json").write_text(json.dumps(record, indent=1) + "\n")
    figures = []
    for scenes in args.heldout:
        figures.append(args.out / ("downstream.png" if scenes == "world" else f"downstream-{scenes}.png"))
        plot(summary[scenes], figures[-1], f"{title}, held-out scenes: {scenes}")
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in clock.spent.items())
    print(f"\nwrote {args.out / 'downstream.json'} and {', '.join(map(str, figures))}")
    print(f"wall time {wall:.0f} s ({phases})")


if __name__ == "__main__":
    main()
