"""Decoding: every kind of bad image is a classified failure, never an exception; batches keep order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.transforms.functional import pil_to_tensor

from misp_dpo.embed.decode import ImageFailure, TaskBatches, decode, read
from misp_dpo.embed.readers import ImageRef, list_folder
from tests.embed.images import png, write_bad_images, write_pngs


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"", "empty file"), (b"hello", "not an image"), (png(1)[:200], "undecodable image")],
)
def test_bad_bytes_are_classified(data: bytes, reason: str) -> None:
    with pytest.raises(ImageFailure) as failure:
        decode(data, pil_to_tensor)
    assert failure.value.reason == reason


def test_unreadable_refs_are_classified(tmp_path: Path) -> None:
    for ref, reason in [
        (None, "missing image"),
        (ImageRef(uri="x", path=str(tmp_path / "nope.png")), "missing file"),
        (ImageRef(uri="d", path=str(tmp_path)), "unreadable file"),
    ]:
        with pytest.raises(ImageFailure) as failure:
            read(ref)
        assert failure.value.reason == reason


def test_batches_carry_failures_and_one_tensor_per_distinct_image(tmp_path: Path) -> None:
    reasons = write_bad_images(tmp_path)
    write_pngs(tmp_path, ["a.png", "b.png"])
    (tmp_path / "c.png").write_bytes((tmp_path / "a.png").read_bytes())
    corpus = list_folder(tmp_path)
    batches = TaskBatches(
        None, (0, 0), corpus, (0, corpus.num_items), 4, pil_to_tensor, lambda t: torch.zeros(0)
    )
    prepared = list(batches)
    assert [len(b.ids) for b in prepared] == [4, 2]
    names = [Path(uri).name for b in prepared for uri in b.uris]
    assert names == ["a.png", "b.png", "c.png", "empty.png", "text.jpg", "truncated.png"]
    first = prepared[0]
    assert first.ids[0] == first.ids[2] and len(first.pixel_ids) == 2 and first.pixels.shape == (2, 3, 32, 32)
    failed = {Path(f.item).name: f.reason for b in prepared for _, f in b.failures}
    assert failed == reasons
