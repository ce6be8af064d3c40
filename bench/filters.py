"""How well the candidates filters remove false negatives on the demo corpus, and IVF recall there.

    python bench/filters.py --embeddings runs/demo/embeddings --synth runs/demo/synth [--sweep]

The demo corpus knows every image's attributes (shape, colour, size, position, background). A pool
image with all five equal to the positive's is a false negative (it would make the chosen answer
true); one differing in exactly one attribute is the hard negative the method wants. For the pools
before the filters (only the positive itself removed) and after them, this prints the share of
each among the pool's images and how many of the one-attribute-different images survive. With
--sweep it does so over a grid of --dup-threshold x --margin, which is how the defaults were chosen.
It also prints the recall@pool of IVF indexes against exact search on these embeddings.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from misp_dpo.mining.candidates import PoolSettings, build_pools
from misp_dpo.mining.index import IndexSpec, Searcher, auto_nlist, build_index, choose_index
from misp_dpo.pipelines.embeddings import ImageStore, read_embeddings
from misp_dpo.pipelines.io import read_table, vectors_to_numpy

OFF = {"dup_threshold": 2.0, "margin": -2.0}  # every filter but the positive itself turned off


def attribute_codes(store: ImageStore, synth: Path) -> np.ndarray:
    """(N, A) attribute value codes per store row, matched on the image file name of each uri."""
    table = pq.read_table(synth / "attributes.parquet")
    names = [Path(p).name for p in table.column("image").to_pylist()]
    row_of = {name: i for i, name in enumerate(names)}
    columns = [c for c in table.column_names if c != "image"]
    codes = np.stack(
        [table.column(c).combine_chunks().dictionary_encode().indices.to_numpy() for c in columns], axis=1
    )
    found = np.array([row_of.get(Path(uri).name, -1) for uri in store.uris.to_pylist()])
    if (found < 0).any():
        raise SystemExit(f"{(found < 0).sum()} embedded images have no attributes in {synth}")
    return codes[found]


def measure(pools_rows: np.ndarray, positive_rows: np.ndarray, codes: np.ndarray) -> dict[str, float]:
    """Shares of pool images equal to the positive in all attributes, and in all but one."""
    mask = pools_rows >= 0
    equal = (codes[np.maximum(pools_rows, 0)] == codes[positive_rows][:, None, :]).sum(axis=2)
    attributes = codes.shape[1]
    same = (equal == attributes) & mask
    one_off = (equal == attributes - 1) & mask
    total = mask.sum()
    return {
        "pool": total / len(mask),
        "same": same.sum() / total,
        "one_off": one_off.sum() / total,
        "one_off_per_pair": one_off.sum() / len(mask),
    }


def run(args: argparse.Namespace) -> None:
    manifest, _ = read_embeddings(Path(args.embeddings))
    store = ImageStore.load(manifest)
    codes = attribute_codes(store, Path(args.synth))
    pairs = read_table(manifest.shard_paths("pairs"), ["image_id", "prompt_embedding", "chosen_embedding"])
    positive_rows = store.rows(pairs.column("image_id"))
    prompt = vectors_to_numpy(pairs.column("prompt_embedding"))
    chosen = vectors_to_numpy(pairs.column("chosen_embedding"))
    searcher = Searcher(
        build_index(store.vectors, IndexSpec("Flat")), IndexSpec("Flat"), "cpu", args.pool + 16
    )

    def pools_for(**overrides: float) -> dict[str, float]:
        settings = PoolSettings(**{"pool": args.pool, "prompt_share": args.prompt_share, **overrides})
        pools = build_pools(searcher.search, store.vectors, positive_rows, prompt, chosen, settings)
        return measure(pools.rows, positive_rows, codes) | {"removed": pools.removed}

    before = pools_for(**OFF)
    defaults = PoolSettings()
    after = pools_for(dup_threshold=defaults.dup_threshold, margin=defaults.margin)
    print(
        f"{len(store)} images, {len(positive_rows)} pairs, pool {args.pool}, prompt_share {args.prompt_share}"
    )
    for name, result in (("before filters", before), (f"after (defaults {defaults})", after)):
        print(
            f"{name}: same attributes {result['same']:.2%} of pool images, one attribute different "
            f"{result['one_off']:.2%} ({result['one_off_per_pair']:.1f} a pair), "
            f"pool size {result['pool']:.1f}; removed {result['removed']}"
        )
    kept = after["one_off_per_pair"] / before["one_off_per_pair"]
    print(f"one-attribute-different images kept by the filters: {kept:.0%} (of those in the unfiltered pool)")
    if args.sweep:
        sweep(pools_for, before, args.dups, args.margins)
    ivf_recall(store, positive_rows, searcher, args.pool)


def sweep(pools_for: object, before: dict[str, float], dups: str, margins: str) -> None:
    print(f"{'dup_threshold':>13} {'margin':>7} {'same':>7} {'one_off':>8} {'one_off kept':>13}")
    for dup in (float(d) for d in dups.split(",")):
        for margin in (float(m) for m in margins.split(",")):
            r = pools_for(dup_threshold=dup, margin=margin)  # type: ignore[operator]
            kept = r["one_off_per_pair"] / before["one_off_per_pair"]
            print(f"{dup:>13.3f} {margin:>7.3f} {r['same']:>7.2%} {r['one_off']:>8.2%} {kept:>13.0%}")


def ivf_recall(store: ImageStore, positive_rows: np.ndarray, exact: Searcher, pool: int) -> None:
    queries = store.vectors[positive_rows].astype(np.float32)
    k = pool + 1  # the positive itself is its own nearest neighbour
    truth = exact.search(queries, k)[1]
    n, dim = store.vectors.shape
    nlist = auto_nlist(n)
    for factory in (f"IVF{nlist},Flat", f"IVF{nlist},SQ8"):
        default = choose_index(n, dim, 1, factory).nprobe
        for nprobe in sorted({max(1, default // 4), default, min(nlist, default * 2)}):
            spec = choose_index(n, dim, 1, factory, nprobe)
            started = time.perf_counter()
            found = Searcher(build_index(store.vectors, spec), spec, "cpu", k).search(queries, k)[1]
            recall = np.mean([len(np.intersect1d(f, t)) / k for f, t in zip(found, truth, strict=True)])
            seconds = time.perf_counter() - started
            note = " (default)" if nprobe == default else ""
            print(f"{factory} nprobe {nprobe}{note}: recall@{pool} {recall:.3f} vs exact ({seconds:.1f}s)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--embeddings", default="runs/demo/embeddings", help="an embed output of the demo")
    parser.add_argument("--synth", default="runs/demo/synth", help="the synth corpus it was made from")
    parser.add_argument("--pool", type=int, default=64)
    parser.add_argument("--prompt-share", type=float, default=PoolSettings().prompt_share)
    parser.add_argument("--sweep", action="store_true", help="grid of --dup-threshold x --margin")
    parser.add_argument("--dups", default="0.9,0.95,0.97,0.98,0.99,2", help="sweep: dup thresholds")
    parser.add_argument("--margins", default="-0.05,-0.02,-0.01,0,0.01,0.02,0.05,-2", help="sweep: margins")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
