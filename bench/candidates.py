"""Benchmark: the candidates stage against raw FAISS search and sentence-transformers' mine_hard_negatives.

    python bench/candidates.py            # acceptance size: 1M x 512 float16 corpus, 10k pairs
    python bench/candidates.py --quick    # 100k x 512, 2k pairs (a minute)
    python bench/candidates.py --n 300000 --pairs 5000 --ivf

The corpus is clustered like CLIP embeddings (n/1000 centres, within-cluster cosine ~0.6), written
once as an `embed` output under --work and reused. Each contender runs in its own subprocess, so its
peak RSS (ru_maxrss) is its own:

- stage: `misp-dpo candidates` end to end (read the store, build and save the index, search the
  positive and the prompt of every pair, filter, write Parquet), one task;
- faiss: the same index type searched with the same 2 x pairs queries and k, nothing else timed;
- st: sentence-transformers' `mine_hard_negatives(use_faiss=True)`, the embeddings served by a
  StaticEmbedding model whose vocabulary is the image ids (its output is exactly our vectors),
  one query (the positive) per pair, top pool + headroom, absolute_margin = 1 - dup_threshold;
- ivf (--ivf): recall@pool of the auto IVF index (SQ8) and of IVF-Flat against exact search.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared fixtures: tests.helpers

HEADROOM = 16


def peak_rss_gb() -> float:
    """This process's peak RSS: VmHWM, which (unlike ru_maxrss) does not inherit the parent's peak."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def corpus_dir(args: argparse.Namespace) -> Path:
    return Path(args.work) / f"emb-{args.n}x{args.dim}-{args.pairs}"


def role_generate(args: argparse.Namespace) -> dict:
    from tests.helpers import clustered_unit_vectors, write_embeddings

    rng = np.random.default_rng(0)
    images, _ = clustered_unit_vectors(
        args.n, args.dim, max(10, args.n // 1000), 0.8 / np.sqrt(args.dim), rng, dtype=np.float16
    )
    rows = rng.integers(0, args.n, size=args.pairs)
    positive = images[rows].astype(np.float32)
    noise, _ = clustered_unit_vectors(args.pairs, args.dim, 50, 0.3, rng)
    prompt = 0.3 * positive + noise  # text embeddings: cosine ~0.3 to their image
    chosen = 0.5 * positive + noise
    for text in (prompt, chosen):
        text /= np.linalg.norm(text, axis=1, keepdims=True)
    out = corpus_dir(args)
    write_embeddings(out, images, rows, prompt, chosen, tasks=max(1, args.n // 250_000), label="bench")
    return {"folder": str(out)}


def role_stage(args: argparse.Namespace) -> dict:
    from misp_dpo.mining.candidates import PoolSettings
    from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
    from misp_dpo.pipelines.stages.candidates import CandidatesConfig, CandidatesStage

    out = Path(args.work) / "stage-out"
    shutil.rmtree(out, ignore_errors=True)
    cfg = CandidatesConfig(
        embeddings=corpus_dir(args),
        out=out,
        pools=PoolSettings(pool=args.pool, headroom=HEADROOM, prompt_share=args.prompt_share),
    )
    started, cpu = time.perf_counter(), cpu_seconds()
    manifest = run_stage(CandidatesStage(), cfg, RunOptions())
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    index_bytes = sum(p.stat().st_size for p in (out / "_index").glob("*.faiss"))
    return {
        "seconds": seconds,
        "cpu": cpu,
        "rss_gb": peak_rss_gb(),
        "index_gb": index_bytes / 2**30,
        "factory": manifest.meta["index"]["factory"],
        "stats": manifest.stats,
        "torch_gb": _import_rss_gb("torch") if "torch" in sys.modules else 0.0,
    }


def _import_rss_gb(module: str) -> float:
    """Peak RSS of a fresh interpreter that only imports `module` (the executor imports torch)."""
    hwm = "[x for x in open('/proc/self/status') if x.startswith('VmHWM')][0].split()[1]"
    code = f"import {module}; print({hwm})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.strip()) / 2**20


def _store_and_queries(args: argparse.Namespace) -> tuple[object, np.ndarray, np.ndarray]:
    from misp_dpo.pipelines.embeddings import ImageStore, read_embeddings
    from misp_dpo.pipelines.io import read_table, vectors_to_numpy

    manifest, _ = read_embeddings(corpus_dir(args))
    store = ImageStore.load(manifest)
    pairs = read_table(manifest.shard_paths("pairs"), ["image_id", "prompt_embedding"])
    positive = store.vectors[store.rows(pairs.column("image_id"))].astype(np.float32)
    return store, positive, vectors_to_numpy(pairs.column("prompt_embedding"))


def role_faiss(args: argparse.Namespace) -> dict:
    from misp_dpo.mining.index import build_index, choose_index, parse_memory

    store, positive, prompt = _store_and_queries(args)
    spec = choose_index(len(store), args.dim, parse_memory("16GB"))
    index = build_index(store.vectors, spec)
    queries = np.concatenate([positive, prompt]) if args.prompt_share > 0 else positive
    k = args.pool + HEADROOM
    started, cpu = time.perf_counter(), cpu_seconds()
    ids = np.concatenate([index.search(queries[lo : lo + 8192], k)[1] for lo in range(0, len(queries), 8192)])
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    np.save(Path(args.work) / "exact-ids.npy", ids[: len(positive)])
    return {"seconds": seconds, "cpu": cpu, "queries": len(queries), "rss_gb": peak_rss_gb()}


def role_ivf(args: argparse.Namespace) -> dict:
    from misp_dpo.mining.index import Searcher, auto_nlist, build_index, choose_index

    store, positive, _ = _store_and_queries(args)
    exact = np.load(Path(args.work) / "exact-ids.npy")[:, : args.pool]
    n, k, results = len(store), args.pool + HEADROOM, {}
    flat_bytes = n * args.dim * 4
    for name, requested, budget in [
        ("auto IVF (budget flat/2)", "auto", flat_bytes // 2),
        ("IVF-Flat", f"IVF{auto_nlist(n)},Flat", flat_bytes * 2),
    ]:
        spec = choose_index(n, args.dim, budget, requested)
        started = time.perf_counter()
        searcher = Searcher(build_index(store.vectors, spec), spec, "cpu", k)
        built = time.perf_counter() - started
        started = time.perf_counter()
        found = searcher.search(positive, k)[1]
        searched = time.perf_counter() - started
        hits = [len(np.intersect1d(f[f >= 0][: args.pool + 1], e)) for f, e in zip(found, exact, strict=True)]
        results[name] = {
            "factory": spec.factory,
            "nprobe": spec.nprobe,
            "recall": float(np.mean(hits)) / args.pool,
            "build_s": built,
            "queries_per_s": len(positive) / searched,
        }
    return results


def role_st(args: argparse.Namespace) -> dict:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from sentence_transformers.util import mine_hard_negatives
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    store, _, _ = _store_and_queries(args)
    from misp_dpo.mining.candidates import PoolSettings
    from misp_dpo.pipelines.embeddings import read_embeddings
    from misp_dpo.pipelines.io import read_table

    manifest, _ = read_embeddings(corpus_dir(args))
    pair_rows = store.rows(read_table(manifest.shard_paths("pairs"), ["image_id"]).column(0))
    started, cpu = time.perf_counter(), cpu_seconds()
    names = [f"i{r}" for r in range(len(store))]
    tokenizer = Tokenizer(WordLevel({name: r for r, name in enumerate(names)}, unk_token="i0"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    model = SentenceTransformer(
        modules=[StaticEmbedding(tokenizer, embedding_weights=store.vectors.astype(np.float32))], device="cpu"
    )
    del store
    anchors = [names[r] for r in pair_rows]
    dataset = Dataset.from_dict({"anchor": anchors, "positive": anchors})
    mined = mine_hard_negatives(
        dataset,
        model,
        corpus=names,
        range_max=args.pool + HEADROOM,
        num_negatives=args.pool,
        absolute_margin=1 - PoolSettings().dup_threshold,  # anchor = positive: its near-duplicates
        output_format="labeled-list",
        batch_size=16384,
        use_faiss=True,
        verbose=False,
    )
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    return {"seconds": seconds, "cpu": cpu, "rows": len(mined), "rss_gb": peak_rss_gb()}


ROLES = {"generate": role_generate, "stage": role_stage, "faiss": role_faiss, "ivf": role_ivf, "st": role_st}


def spawn(role: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--role", role, "--n", str(args.n), "--pairs", str(args.pairs)]
    command += ["--dim", str(args.dim), "--pool", str(args.pool), "--work", args.work]
    command += ["--prompt-share", str(args.prompt_share)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"{role} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(args: argparse.Namespace, stage: dict, raw: dict, st: dict | None, ivf: dict | None) -> None:
    pairs = args.pairs
    per_pair = raw["queries"] // pairs  # the stage searches the same queries: 1 or 2 a pair
    print(f"corpus {args.n:,} x {args.dim} float16, {pairs:,} pairs, pool {args.pool} + headroom {HEADROOM}")
    print(f"index {stage['factory']}: {stage['index_gb']:.2f} GB; counts: {json.dumps(stage['stats'])}")
    print(f"{'contender':<44}{'seconds':>9}{'CPU s':>9}{'pairs/s':>10}{'peak RSS GB':>13}")
    rows = [("misp-dpo candidates (whole stage)", stage)]
    rows.append((f"raw FAISS search ({raw['queries'] / raw['seconds']:,.0f} queries/s)", raw))
    if st is not None:
        rows.append(("sentence-transformers mine_hard_negatives", st))
    for label, r in rows:
        rate = pairs / r["seconds"]
        print(f"{label:<44}{r['seconds']:>9.1f}{r['cpu']:>9.1f}{rate:>10.1f}{r['rss_gb']:>13.2f}")
    wall, cpu = raw["seconds"] / stage["seconds"], raw["cpu"] / stage["cpu"]
    print(
        f"stage pairs/s / raw FAISS pairs/s (same index, k, {per_pair} queries a pair): "
        f"{wall:.2f} wall-clock, {cpu:.2f} in CPU time (target >= 0.7); "
        f"per single raw query: {wall / per_pair:.2f}"
    )
    over = stage["rss_gb"] - stage["index_gb"]
    torch_note = (
        f", of which {stage['torch_gb']:.2f} GB is the interpreter with torch" if stage["torch_gb"] else ""
    )
    print(f"stage peak RSS - index size: {over:.2f} GB (target <= 2){torch_note}")
    if st is not None:
        print(
            f"vs sentence-transformers: time x{stage['seconds'] / st['seconds']:.2f} "
            f"(CPU x{stage['cpu'] / st['cpu']:.2f}), peak RSS x{stage['rss_gb'] / st['rss_gb']:.2f}; "
            f"it searches 1 query a pair, the stage {per_pair}"
        )
    for name, result in (ivf or {}).items():
        print(
            f"{name}: {result['factory']} nprobe {result['nprobe']}: "
            f"recall@{args.pool} {result['recall']:.3f} vs exact, build {result['build_s']:.1f}s, "
            f"{result['queries_per_s']:,.0f} queries/s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000, help="corpus images")
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--pool", type=int, default=64)
    parser.add_argument(
        "--prompt-share", type=float, default=0.25, help="0: the stage searches 1 query a pair"
    )
    parser.add_argument("--quick", action="store_true", help="100k images, 2k pairs")
    parser.add_argument("--skip-st", action="store_true", help="leave out sentence-transformers")
    parser.add_argument("--ivf", action="store_true", help="also measure IVF recall against exact search")
    parser.add_argument("--work", default="/tmp/misp-bench-candidates", help="corpus cache and outputs")
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.n, args.pairs = 100_000, 2_000
    if args.role:
        from misp_dpo.log import configure_logging

        configure_logging("json")
        print(json.dumps(ROLES[args.role](args)))
        return
    if not (corpus_dir(args) / "manifest.json").is_file():
        print(f"generating {corpus_dir(args)} ...", flush=True)
        spawn("generate", args)
    stage = spawn("stage", args)
    raw = spawn("faiss", args)
    st = None if args.skip_st else spawn("st", args)
    ivf = spawn("ivf", args) if args.ivf else None
    report(args, stage, raw, st, ivf)


if __name__ == "__main__":
    main()
