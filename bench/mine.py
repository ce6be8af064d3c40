"""Benchmark of the `mine` stage: pairs/s, peak RSS, and where the time goes.

    .venv/bin/python bench/mine.py                 # 100k pairs x pool 64, D = 512 (the issue's size)
    .venv/bin/python bench/mine.py --pairs 5000    # quick

Inputs are generated at the requested size (embed- and candidates-format folders written column-wise,
and a randomly initialised `paper` SAE saved in the sae format), then `misp-dpo mine` runs in a
subprocess so its peak RSS is its own. Its per-task "mine timings" log lines give the share of time
in reading pools, SAE encoding, selection, row building and writing. References measured in the
same run: the raw SAE `encode_pools` loop over the same pools (the floor the stage cannot beat),
and the stage with `--strategy maxmin` (selection without an SAE).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from misp_dpo.pipelines import schemas
from misp_dpo.pipelines.manifest import Manifest, manifest_hash

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared fixtures: tests.helpers
from tests.helpers import (  # noqa: E402
    clustered_unit_vectors,
    write_embeddings,
    write_prewritten,
    write_random_sae,
)

ROOT = Path(__file__).resolve().parents[1]


def make_candidates(
    out: Path,
    embeddings: Manifest,
    images: np.ndarray,
    pair_rows: np.ndarray,
    prompts: np.ndarray,
    pool: int,
    rng: np.random.Generator,
) -> Manifest:
    """A candidates-format folder with `pool` distinct non-positive images per pair, built column-wise."""
    from misp_dpo.pipelines.io import read_table

    n_images, n_pairs = len(images), len(pair_rows)
    step = max(1, (n_images - 2) // pool)
    start = rng.integers(0, max(1, n_images - 1 - pool * step), size=n_pairs)
    rows = (pair_rows[:, None] + 1 + start[:, None] + np.arange(pool)[None, :] * step) % n_images
    sim_image = np.empty((n_pairs, pool), np.float32)
    sim_prompt = np.empty((n_pairs, pool), np.float32)
    for lo in range(0, n_pairs, 4096):
        hi = min(n_pairs, lo + 4096)
        block = images[rows[lo:hi]].astype(np.float32)
        sim_image[lo:hi] = np.einsum("pkd,pd->pk", block, images[pair_rows[lo:hi]].astype(np.float32))
        sim_prompt[lo:hi] = np.einsum("pkd,pd->pk", block, prompts[lo:hi])
    order = np.argsort(-sim_image, axis=1, kind="stable")
    rows = np.take_along_axis(rows, order, axis=1)
    sim_image = np.take_along_axis(sim_image, order, axis=1)
    sim_prompt = np.take_along_axis(sim_prompt, order, axis=1)
    image_ids = read_table(embeddings.shard_paths("images"), ["image_id"]).column(0).combine_chunks()
    pairs = read_table(embeddings.shard_paths("pairs"), ["pair_id", "image_id"])
    struct = pa.StructArray.from_arrays(
        [
            image_ids.take(pa.array(rows.reshape(-1))),
            pa.array(sim_image.reshape(-1)),
            pa.array(sim_prompt.reshape(-1)),
            pa.array(np.tile(np.arange(pool, dtype=np.int32), n_pairs)),
        ],
        fields=list(schemas.CANDIDATE),
    )
    lists = pa.ListArray.from_arrays(pa.array(np.arange(0, n_pairs * pool + 1, pool, dtype=np.int32)), struct)
    table = pa.table({"pair_id": pairs.column(0), "image_id": pairs.column(1), "candidates": lists})
    meta = {**embeddings.meta, "embeddings_dir": str(embeddings.root.resolve())}
    inputs = {"embeddings": manifest_hash(embeddings.root)}
    return write_prewritten(out, "candidates", {"candidates": table}, 1, meta, inputs, label="bench")


def make_inputs(work: Path, pairs: int, pool: int, dim: int, images: int, seed: int) -> tuple[Manifest, Path]:
    rng = np.random.default_rng(seed)
    vectors, _ = clustered_unit_vectors(images, dim, 256, 0.6, rng, dtype=np.float16)
    pair_rows = rng.integers(0, images, size=pairs)
    prompts, _ = clustered_unit_vectors(pairs, dim, 64, 0.6, rng)
    embeddings = write_embeddings(work / "embeddings", vectors, pair_rows, prompts, prompts, label="bench")
    candidates = make_candidates(work / "candidates", embeddings, vectors, pair_rows, prompts, pool, rng)
    sae = write_random_sae(work / "sae", embeddings.meta["clip"], "paper", latents=128, seed=seed)
    return candidates, sae


def run_mine(
    candidates: Path, sae: Path | None, out: Path, strategy: str, batch: int
) -> tuple[float, float, dict]:
    """(seconds, peak RSS GiB, summed timings) of `misp-dpo mine` in a fresh process."""
    command = [
        str(Path(sys.executable).parent / "misp-dpo"),
        "mine",
        "--candidates",
        str(candidates),
        "--out",
        str(out),
        "--strategy",
        strategy,
        "--batch-size",
        str(batch),
        "--log-format",
        "json",
    ]
    if sae is not None:
        command += ["--sae", str(sae)]
    script = (
        "import resource, subprocess, sys, json, time\n"
        "t = time.perf_counter(); p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "dt = time.perf_counter() - t\n"
        "print(json.dumps({'rc': p.returncode, 'seconds': dt, 'err': p.stderr,\n"
        "  'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, *command], capture_output=True, text=True, cwd=ROOT)
    result = json.loads(done.stdout)
    if result["rc"] != 0:
        raise SystemExit(f"mine failed:\n{result['err'][-3000:]}")
    timings: dict[str, float] = {}
    for line in result["err"].splitlines():
        record = json.loads(line) if line.startswith("{") else {}
        if record.get("message") == "mine timings":
            for key in ("read", "encode", "select", "build", "write"):
                timings[key] = timings.get(key, 0.0) + record[key]
    return result["seconds"], result["rss"] / 2**20, timings


def raw_encode(candidates: Manifest, sae: Path, batch: int, limit: int) -> float:
    """pairs/s of the bare `encode_pools` loop over the first `limit` pairs' pools (the reference)."""
    from misp_dpo.pipelines.embeddings import ImageStore, upstream_embeddings
    from misp_dpo.pipelines.pools import iter_pools
    from misp_dpo.sae import load_sae

    embeddings, _ = upstream_embeddings(candidates, "--candidates")
    store = ImageStore.load(embeddings)
    encoder = load_sae(sae, device="auto")
    batches = list(iter_pools(candidates, embeddings, store, 0, limit, batch))
    started = time.perf_counter()
    for b in batches:
        encoder.encode_pools(b.positive, b.candidates, b.prompt, b.mask)
    return limit / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--pool", type=int, default=64)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--images", type=int, default=0, help="corpus size (default: 2 x pairs)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--reference-pairs", type=int, default=2000, help="pairs in the raw encode loop")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-mine-"))
    started = time.perf_counter()
    candidates, sae = make_inputs(
        work, args.pairs, args.pool, args.dim, args.images or 2 * args.pairs, args.seed
    )
    print(
        f"inputs: {args.pairs} pairs x pool {args.pool}, D={args.dim} in {work} "
        f"({time.perf_counter() - started:.0f} s to generate)"
    )
    reference = raw_encode(candidates, sae, args.batch_size, min(args.reference_pairs, args.pairs))
    results = {}
    for strategy, sae_dir in (("misp", sae), ("maxmin", None)):
        seconds, rss, timings = run_mine(
            candidates.root, sae_dir, work / f"neg-{strategy}", strategy, args.batch_size
        )
        results[strategy] = (seconds, rss, timings)
        total = sum(timings.values()) or 1.0
        shares = ", ".join(f"{k} {v / total:.0%}" for k, v in timings.items())
        print(
            f"mine --strategy {strategy:6s}: {args.pairs / seconds:9.0f} pairs/s  {seconds:7.1f} s  "
            f"peak RSS {rss:.2f} GiB  time in tasks: {shares}"
        )
    misp_rate = args.pairs / results["misp"][0]
    print(f"raw SAE encode_pools loop: {reference:9.0f} pairs/s")
    print(
        f"ratio mine(misp) / raw encode loop: {misp_rate / reference:.2f}  "
        f"(1.0 = the stage costs nothing beyond the SAE)"
    )
    print(f"ratio mine(misp) / mine(maxmin): {misp_rate / (args.pairs / results['maxmin'][0]):.2f}")
    print(f"this process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
