"""Each pair's candidate pool: nearest corpus images to the positive and to the prompt, filtered.

For a batch of pairs (docs/method.md §1):

1. retrieve the `pool + headroom` nearest corpus images to the positive image embedding, and as
   many to the prompt embedding (one FAISS search of both query sets; none when `prompt_share` is
   0), and merge them without repeats; the headroom lets the pool stay full after filtering;
2. compute every candidate's cosine to the positive (`sim_image`), to the prompt (`sim_prompt`) and
   to the chosen response from the stored embeddings, so the figures do not depend on the index
   type (an IVF-SQ8 index returns approximate scores);
3. drop, counting each candidate under the first rule that catches it: the positive itself (its id:
   the image store holds each id once, so every copy of the same bytes is that one row); identical
   images (squared distance between the embeddings <= IDENTICAL_DISTANCE2: the same picture under
   other bytes, e.g. re-saved with other metadata; a cosine test cannot tell them apart from
   distinct images in a crowded embedding space, where float16 norms make cosines reach 1.0);
   near-duplicates (cosine >= dup_threshold); likely false negatives (cosine to the chosen response
   >= the positive's minus margin: such an image would make the chosen answer true, NV-Retriever's
   positive-aware filter, Moreira et al. 2024);
4. keep at most `pool`: the `pool - round(prompt_share * pool)` survivors most similar to the
   positive, then the rest by similarity to the prompt (image-keyed survivors fill in when the
   prompt-keyed ones run out). The pool therefore has exactly `pool` images whenever that many
   survive, and a fixed share of slots goes to prompt-relevant images rather than only to the image
   neighbours, which would always outrank them;
5. rank the kept images by similarity to the positive (rank 0 = most similar), ties by store row.

`candidate_pools`, the candidates stage's entry point, first sets aside the pairs it cannot serve (the
positive missing from the corpus, a non-finite embedding) and gives them an empty pool in place.

Everything is vectorised over the batch; candidates are gathered in sub-batches of at most
GATHER_FLOATS floats (128 pairs x 160 candidates x 512 dimensions at the default pool), so memory
stays flat whatever the pool size: a pool of 5000 gathers a few pairs at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from misp_dpo.config import option

# Re-encoding one picture moves its embedding by ~1e-6 in squared distance (bf16 arithmetic,
# float16 storage); the closest distinct images of the demo's tiny CLIP are 3e-5 apart.
IDENTICAL_DISTANCE2 = 1e-5
GATHER_FLOATS = 128 * 160 * 512  # candidate embeddings gathered at once, as float32: 42 MB
FILTERS = ("self", "duplicate", "near_duplicate", "false_negative")
SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True, kw_only=True)
class PoolSettings:
    """Pool size and filter thresholds (see the module docstring for what each does).

    The default thresholds come from `bench/filters.py --sweep` on the demo corpus without its
    language prior (4000 pairs, pool 64): with them, images that share every attribute with the
    positive fall from 6.3% of the pool to 1.6%, while the images that differ in one attribute stay
    (the refill from the headroom keeps 102% of them). The false-negative margin removes fewer hard
    negatives per false negative caught than the near-duplicate threshold, so the threshold only
    takes what is almost the same picture. The margin is in units of image-text cosine, whose spread
    depends on the CLIP model: the demo's own CLIP on its prior world takes 0.1 (0.03% left,
    configs/demo.toml says why), real CLIP models' narrower spread wants less.
    """

    pool: int = option(64, "candidates kept per pair after filtering, ranked by similarity to the positive")
    headroom: int = option(
        16, "extra neighbours retrieved per query beyond --pool, so filtering leaves it full"
    )
    prompt_share: float = option(
        0.25, "share of the pool filled by the survivors most similar to the prompt (the rest: to the image)"
    )
    dup_threshold: float = option(
        0.99, "drop near-duplicates: cosine to the positive image >= this (values above 1 turn it off)"
    )
    margin: float = option(
        0.01,
        "drop likely false negatives: cosine to the chosen response >= the positive's minus this "
        "(larger drops more; -2 turns it off)",
    )
    min_pool: int = option(8, "pairs left with fewer candidates are counted (small_pools) and reported")

    def __post_init__(self) -> None:
        if self.pool < 1 or self.headroom < 0 or not 0 <= self.min_pool <= self.pool:
            raise ValueError(
                f"need pool >= 1, headroom >= 0 and 0 <= min_pool <= pool; got pool={self.pool}, "
                f"headroom={self.headroom}, min_pool={self.min_pool}"
            )
        if not 0.0 <= self.prompt_share <= 1.0:
            raise ValueError(f"prompt_share must be in [0, 1], got {self.prompt_share}")
        if not 0.0 < self.dup_threshold <= 2.0:
            raise ValueError(f"dup_threshold must be in (0, 2], got {self.dup_threshold}")
        if not -2.0 <= self.margin <= 2.0:
            raise ValueError(f"margin must be in [-2, 2], got {self.margin}")

    @property
    def k(self) -> int:
        return self.pool + self.headroom


class RetrievedPools(NamedTuple):
    """Pools of a batch of pairs, padded to `pool` columns; padding has row -1."""

    rows: np.ndarray  # (P, pool) int64 corpus rows in rank order
    sim_image: np.ndarray  # (P, pool) float32
    sim_prompt: np.ndarray  # (P, pool) float32
    sizes: np.ndarray  # (P,) int64
    removed: dict[str, int]  # filter name -> candidates it removed
    retrieved: int  # distinct candidates retrieved before filtering


class CandidatePools(NamedTuple):
    """A batch's pools, one row per pair in batch order; an unusable pair's pool is empty."""

    pools: RetrievedPools
    usable: np.ndarray  # (P,) bool
    unusable: list[tuple[int, str]]  # (index in the batch, why) of each unusable pair


def candidate_pools(
    search: SearchFn,
    vectors: np.ndarray,
    positive_rows: np.ndarray,
    prompt: np.ndarray,
    chosen: np.ndarray,
    settings: PoolSettings,
) -> CandidatePools:
    """Pools for every pair of a batch; `positive_rows[p]` is -1 when the positive is not in the corpus.

    Such a pair, or one with a non-finite embedding, is unusable: `build_pools` runs on the others.
    """
    positive_ok = positive_rows >= 0
    finite = np.isfinite(prompt).all(axis=1) & np.isfinite(chosen).all(axis=1)
    finite &= np.isfinite(vectors[np.maximum(positive_rows, 0)]).all(axis=1)
    usable = positive_ok & finite
    unusable = [
        (
            int(p),
            "positive image missing from the embeddings" if not positive_ok[p] else "non-finite embedding",
        )
        for p in np.flatnonzero(~usable)
    ]
    found = build_pools(search, vectors, positive_rows[usable], prompt[usable], chosen[usable], settings)
    return CandidatePools(_expand(found, usable), usable, unusable)


def _expand(found: RetrievedPools, usable: np.ndarray) -> RetrievedPools:
    """Pools of the usable pairs placed back among all pairs of the batch (the others empty)."""
    rows = np.full((len(usable), found.rows.shape[1]), -1, dtype=np.int64)
    sim_image = np.zeros(rows.shape, dtype=np.float32)
    sim_prompt = np.zeros(rows.shape, dtype=np.float32)
    sizes = np.zeros(len(usable), dtype=np.int64)
    rows[usable], sim_image[usable], sim_prompt[usable], sizes[usable] = (
        found.rows,
        found.sim_image,
        found.sim_prompt,
        found.sizes,
    )
    return RetrievedPools(rows, sim_image, sim_prompt, sizes, found.removed, found.retrieved)


def build_pools(
    search: SearchFn,
    vectors: np.ndarray,
    positive_rows: np.ndarray,
    prompt: np.ndarray,
    chosen: np.ndarray,
    settings: PoolSettings,
) -> RetrievedPools:
    """Pools for pairs whose positive is corpus row `positive_rows[p]` (all rows must be valid).

    `search(queries, k)` returns (scores, ids) of the k nearest corpus rows, ids -1 when missing;
    `vectors` are the corpus embeddings it indexes, `prompt` and `chosen` (P, D) text embeddings.
    """
    n_pairs = len(positive_rows)
    out = _empty(n_pairs, settings.pool)
    removed = dict.fromkeys(FILTERS, 0)
    if n_pairs == 0 or len(vectors) == 0:
        return RetrievedPools(*out, removed=removed, retrieved=0)
    k = min(settings.k, len(vectors))
    positive = vectors[positive_rows].astype(np.float32)
    prompt = np.asarray(prompt, dtype=np.float32)
    if settings.prompt_share > 0:
        _, found = search(np.concatenate([positive, prompt]), k)
        union = merge_neighbours(found[:n_pairs], found[n_pairs:])
    else:  # no prompt slots: the prompt's neighbours could only fill holes, not worth a second search
        union = merge_neighbours(search(positive, k)[1], np.full((n_pairs, 0), -1, dtype=np.int64))
    step = max(1, GATHER_FLOATS // (union.shape[1] * vectors.shape[1]))
    for lo in range(0, n_pairs, step):
        part = slice(lo, lo + step)
        sims = candidate_sims(vectors, union[part], positive[part], prompt[part], chosen[part])
        reference = positive_reference(positive[part], chosen[part])
        keep, counts = apply_filters(union[part], positive_rows[part], sims, reference, settings)
        for name, count in counts.items():
            removed[name] += count
        picked = select_pool(union[part], sims[..., 0], sims[..., 1], keep, settings)
        _gather(out, part, union[part], sims, picked)
    return RetrievedPools(*out, removed=removed, retrieved=int((union >= 0).sum()))


def merge_neighbours(by_image: np.ndarray, by_prompt: np.ndarray) -> np.ndarray:
    """(P, 2k) distinct corpus rows per pair, ascending, -1 (missing or repeated) first."""
    union = np.sort(np.concatenate([by_image, by_prompt], axis=1), axis=1)
    repeated = np.zeros_like(union, dtype=bool)
    repeated[:, 1:] = union[:, 1:] == union[:, :-1]
    union[repeated] = -1
    return np.sort(union, axis=1)


def candidate_sims(
    vectors: np.ndarray, rows: np.ndarray, positive: np.ndarray, prompt: np.ndarray, chosen: np.ndarray
) -> np.ndarray:
    """(P, U, 4): each candidate's cosine to the positive, the prompt and the chosen response, and
    its squared norm (for the distance to the positive)."""
    gathered = vectors[np.maximum(rows, 0)].astype(np.float32)  # (P, U, D)
    keys = np.stack([positive, prompt, np.asarray(chosen, np.float32)], axis=2)  # (P, D, 3)
    norms = np.einsum("pud,pud->pu", gathered, gathered)[..., None]
    return np.concatenate([np.matmul(gathered, keys), norms], axis=2)


def positive_reference(positive: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """(P, 2): the positive's cosine to the chosen response and its squared norm."""
    chosen = np.asarray(chosen, np.float32)
    return np.stack([np.einsum("pd,pd->p", positive, chosen), np.einsum("pd,pd->p", positive, positive)], 1)


def apply_filters(
    rows: np.ndarray,
    positive_rows: np.ndarray,
    sims: np.ndarray,
    reference: np.ndarray,
    settings: PoolSettings,
) -> tuple[np.ndarray, dict[str, int]]:
    """(keep mask, removed count per filter); each candidate is counted under its first rule.

    `sims` come from `candidate_sims`, `reference` from `positive_reference`.
    """
    valid = rows >= 0
    sim_image, sim_chosen, norm2 = sims[..., 0], sims[..., 2], sims[..., 3]
    distance2 = norm2 + reference[:, 1:2] - 2 * sim_image
    rules = {
        "self": rows == positive_rows[:, None],
        "duplicate": distance2 <= IDENTICAL_DISTANCE2,
        "near_duplicate": sim_image >= settings.dup_threshold,
        "false_negative": sim_chosen >= reference[:, 0:1] - settings.margin,
    }
    keep = valid.copy()
    counts = {}
    for name, hit in rules.items():
        caught = keep & hit
        counts[name] = int(caught.sum())
        keep &= ~caught
    return keep, counts


def select_pool(
    rows: np.ndarray, sim_image: np.ndarray, sim_prompt: np.ndarray, keep: np.ndarray, settings: PoolSettings
) -> np.ndarray:
    """(P, pool) column indices into `rows` of the kept pool in rank order, -1 padded."""
    pool = settings.pool
    by_image = _rank(sim_image, rows, keep)
    image_slots = pool - round(settings.prompt_share * pool)
    chosen = keep & (by_image < image_slots)
    rest = keep & ~chosen
    by_prompt = _rank(sim_prompt, rows, rest)
    chosen |= rest & (by_prompt < (pool - chosen.sum(axis=1, keepdims=True)))
    order = np.lexsort((rows, -np.where(chosen, sim_image, -np.inf)), axis=1)[:, :pool]
    taken = np.take_along_axis(chosen, order, axis=1)
    return np.where(taken, order, -1)


def _rank(score: np.ndarray, rows: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each masked entry's position when its row is sorted by score (descending), ties by row."""
    order = np.lexsort((rows, -np.where(mask, score, -np.inf)), axis=1)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(order.shape[1])[None, :], axis=1)
    return ranks


Blocks = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # rows, sim_image, sim_prompt, sizes


def _empty(n_pairs: int, pool: int) -> Blocks:
    return (
        np.full((n_pairs, pool), -1, dtype=np.int64),
        np.zeros((n_pairs, pool), dtype=np.float32),
        np.zeros((n_pairs, pool), dtype=np.float32),
        np.zeros(n_pairs, dtype=np.int64),
    )


def _gather(out: Blocks, part: slice, rows: np.ndarray, sims: np.ndarray, picked: np.ndarray) -> None:
    width = picked.shape[1]
    ok = picked >= 0
    index = np.maximum(picked, 0)
    target = slice(part.start, part.start + len(rows))
    out[0][target, :width] = np.where(ok, np.take_along_axis(rows, index, axis=1), -1)
    out[1][target, :width] = np.where(ok, np.take_along_axis(sims[..., 0], index, axis=1), 0)
    out[2][target, :width] = np.where(ok, np.take_along_axis(sims[..., 1], index, axis=1), 0)
    out[3][target] = ok.sum(axis=1)
