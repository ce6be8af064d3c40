"""The task-wide record of embedded images: exact membership in 20 bytes an image."""

from __future__ import annotations

import hashlib

import numpy as np

from misp_dpo.embed.encode import SeenImages


def _ids(numbers: np.ndarray) -> list[str]:
    return [hashlib.sha1(str(int(k)).encode()).hexdigest() for k in numbers]


def test_seen_images_agree_with_a_set_over_many_batches() -> None:
    rng = np.random.default_rng(0)
    seen, reference = SeenImages(), set()
    for size in rng.integers(0, 60, 200):
        batch = _ids(rng.choice(3000, size=size, replace=False))
        new = seen.add(batch)
        assert new.tolist() == [i not in reference for i in batch]
        reference.update(batch)
        assert len(seen) == len(reference)
    assert sum(len(run) for run in seen.runs) == len(reference)
    lengths = [len(run) for run in seen.runs]
    assert lengths == sorted(lengths, reverse=True) and len(set(lengths)) == len(lengths)
    assert len(lengths) <= np.log2(len(reference)) + 1
    assert all((run[:-1] < run[1:]).all() for run in seen.runs)
    assert sum(run.nbytes for run in seen.runs) == 20 * len(reference)


def test_digests_that_differ_only_in_trailing_zero_bytes_stay_distinct() -> None:
    seen = SeenImages()
    base = "ab" * 18
    assert seen.add([base + "0000", base + "0001"]).tolist() == [True, True]
    assert seen.add([base + "0001", base + "0100", base + "0000"]).tolist() == [False, True, False]
