"""Quality of the mined negatives on the demo corpus, against its ground-truth attributes.

    make mine                         # once: synth -> fit-clip -> embed -> candidates -> sae -> ...
    .venv/bin/python bench/quality.py [--root runs/demo] [--seeds 0,1,2]

For each strategy (misp with the `paper` SAE, misp with the `topk` SAE, maxmin, nearest, random) it
mines the demo candidates again into ROOT/quality/ and prints, over several seeds:
- false negatives: share of negatives with every attribute of their positive (they would make the
  chosen answer true);
- hardness: mean number of attributes a negative changes (1 = a minimal edit; lower = harder);
- coverage: distinct attribute types changed across a pair's negatives / number of types.
Seeds are those of SAE training (misp) and of the random draw (random); maxmin and nearest are
deterministic given the candidates, so they run once. The corpus, CLIP and candidates are the
demo's own (seed 0), shared by every row, so rows differ only by how negatives are selected.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from misp_dpo.log import configure_logging
from misp_dpo.mining.attributes import AttributeTable, Quality, dataset_quality
from misp_dpo.pipelines.io import iter_batches
from misp_dpo.pipelines.runtime.pipeline_file import load_pipeline
from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
from misp_dpo.pipelines.stages import STAGES
from misp_dpo.pipelines.stages.mine import MineStage

ROOT = Path(__file__).resolve().parents[1]
TARGETS = "misp targets: false negatives <= 1%, coverage >= 1.3 x nearest's, hardness <= nearest's + 1"


def demo_stage(root: Path, name: str) -> tuple[object, object]:
    """The demo pipeline's stage `name` and its config, with the paths under `root`."""
    for stage, cfg, _ in load_pipeline(ROOT / "configs/demo.toml", STAGES, str(root)):
        if stage.name == name:
            return stage, cfg
    raise SystemExit(f"configs/demo.toml has no [{name}] stage")


def train_sae(root: Path, variant: str, seed: int) -> Path:
    """The demo pipeline's [sae] stage with another variant / seed, into ROOT/quality/."""
    stage, cfg = demo_stage(root, "sae")
    out = root / "quality" / f"sae-{variant}-s{seed}"
    run_stage(stage, dataclasses.replace(cfg, out=out, variant=variant, seed=seed), RunOptions())  # type: ignore[arg-type, type-var]
    return out


def mine(root: Path, name: str, strategy: str, sae: Path | None, seed: int, **extra: object) -> Path:
    """The demo pipeline's [mine] settings (weights, beta_div, relevance, N) with another strategy."""
    _, demo = demo_stage(root, "mine")
    out = root / "quality" / name
    cfg = dataclasses.replace(demo, out=out, sae=sae, strategy=strategy, seed=seed, **extra)  # type: ignore[type-var]
    run_stage(MineStage(), cfg, RunOptions())
    return out


def measure(attributes: AttributeTable, negatives: Path) -> Quality:
    return dataset_quality(
        attributes, iter_batches(sorted(negatives.glob("train-*.parquet")), ["positive", "negatives"])
    )


def runs(root: Path, seeds: list[int], extra: dict[str, object]) -> dict[str, list[tuple[str, Path]]]:
    """Mine every strategy (and seed) once; finished outputs are reused on a rerun."""
    found: dict[str, list[tuple[str, Path]]] = {}
    tag = "".join(
        f"-{k}{v}".replace(" ", "").replace("(", "").replace(")", "") for k, v in sorted(extra.items())
    )
    maxmin_extra = {k: v for k, v in extra.items() if k == "beta_div"}
    for seed in seeds:
        for variant in ("paper", "topk"):
            sae = train_sae(root, variant, seed)
            path = mine(root, f"misp-{variant}{tag}-s{seed}", "misp", sae, 0, **extra)
            found.setdefault(f"misp ({variant} SAE)", []).append((f"SAE seed {seed}", path))
        path = mine(root, f"random-s{seed}", "random", None, seed)
        found.setdefault("random", []).append((f"draw seed {seed}", path))
    maxmin_tag = f"-beta_div{maxmin_extra['beta_div']}" if maxmin_extra else ""
    found["maxmin"] = [
        ("deterministic", mine(root, f"maxmin{maxmin_tag}", "maxmin", None, 0, **maxmin_extra))
    ]
    found["nearest"] = [("deterministic", mine(root, "nearest", "nearest", None, 0))]
    return found


def _cell(values: list[float], percent: bool = False) -> str:
    scale = 100.0 if percent else 1.0
    mean, spread = float(np.mean(values)) * scale, float(np.std(values)) * scale
    unit = "%" if percent else ""
    return f"{mean:6.2f}{unit} ± {spread:4.2f}" if len(values) > 1 else f"{mean:6.2f}{unit}       "


def report(results: dict[str, list[Quality]]) -> None:
    near = results["nearest"][0]
    print(
        f"{'strategy':18s} {'runs':>4s}  {'false negatives':>16s}  {'hardness':>13s}  {'coverage':>13s}"
        "  cov/nearest"
    )
    for name, qualities in results.items():
        fn = [q.false_negative_rate for q in qualities]
        hard = [q.hardness for q in qualities]
        cov = [q.coverage for q in qualities]
        print(
            f"{name:18s} {len(qualities):4d}  {_cell(fn, True):>16s}  {_cell(hard):>13s}  {_cell(cov):>13s}  "
            f"{np.mean(cov) / near.coverage:5.2f}x"
        )
    print(TARGETS)
    for name in ("misp (paper SAE)", "misp (topk SAE)"):
        qualities = results[name]
        fn = max(q.false_negative_rate for q in qualities)
        cov = min(q.coverage for q in qualities) / near.coverage
        hard = max(q.hardness for q in qualities) - near.hardness
        checks = [
            f"FN {fn:.2%} {'ok' if fn <= 0.01 else 'MISSED'}",
            f"coverage {cov:.2f}x {'ok' if cov >= 1.3 else 'MISSED'}",
            f"hardness +{hard:.2f} {'ok' if hard <= 1 else 'MISSED'}",
        ]
        print(f"  {name} (worst seed): " + "; ".join(checks))
    maxmin = results["maxmin"][0]
    for name in ("misp (paper SAE)", "misp (topk SAE)"):
        cov = float(np.mean([q.coverage for q in results[name]]))
        fn = float(np.mean([q.false_negative_rate for q in results[name]]))
        hard = float(np.mean([q.hardness for q in results[name]]))
        wins = [
            f"coverage {cov:.3f} vs {maxmin.coverage:.3f} ({'better' if cov > maxmin.coverage else 'worse'})",
            f"FN {fn:.2%} vs {maxmin.false_negative_rate:.2%} "
            f"({'better' if fn < maxmin.false_negative_rate else 'worse'})",
            f"hardness {hard:.2f} vs {maxmin.hardness:.2f} "
            f"({'harder' if hard < maxmin.hardness else 'easier'})",
        ]
        print(f"  {name} vs maxmin: " + "; ".join(wins))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=ROOT / "runs/demo")
    parser.add_argument("--seeds", default="0,1,2", help="SAE training and random-draw seeds")
    parser.add_argument(
        "--beta-div", type=float, default=None, help="override the demo's [mine] beta_div (misp, maxmin)"
    )
    parser.add_argument("--weights", default=None, help="override the demo's [mine] w_l,w_v (misp)")
    parser.add_argument(
        "--relevance", type=float, default=None, help="override the demo's [mine] relevance (misp)"
    )
    args = parser.parse_args()
    configure_logging("json")
    import logging

    logging.getLogger("misp_dpo").setLevel(logging.WARNING)
    attributes_file = args.root / "synth" / "attributes.parquet"
    if not (args.root / "candidates" / "manifest.json").is_file():
        raise SystemExit(f"{args.root}: no finished demo candidates; run `make mine` first")
    import pyarrow.parquet as pq

    attributes = AttributeTable.from_table(pq.read_table(attributes_file), attributes_file.resolve().parent)
    extra: dict[str, object] = {}
    if args.beta_div is not None:
        extra["beta_div"] = args.beta_div
    if args.relevance is not None:
        extra["relevance"] = args.relevance
    if args.weights is not None:
        extra["weights"] = tuple(float(w) for w in args.weights.split(","))
    started = time.perf_counter()
    found = runs(args.root, [int(s) for s in args.seeds.split(",")], extra)
    results = {name: [measure(attributes, path) for _, path in items] for name, items in found.items()}
    unmatched = sum(q.unmatched for qs in results.values() for q in qs)
    print(
        f"demo corpus {args.root}: {results['nearest'][0].pairs} pairs; "
        f"images without attributes: {unmatched}; "
        f"{time.perf_counter() - started:.0f} s"
    )
    report(results)


if __name__ == "__main__":
    main()
