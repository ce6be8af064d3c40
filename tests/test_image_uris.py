"""Every kind of uri `embed` records reads back the exact bytes, and bad ones fail with the right error."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from misp_dpo.dpo.data import SampleError, load_image
from misp_dpo.image_uris import read_uri, relative_to, table_uri, tar_uri
from tests.embed.images import png


def test_local_paths_absolute_file_scheme_and_relative(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png(1))
    assert read_uri(str(tmp_path / "a.png")) == png(1)
    assert read_uri(f"file://{tmp_path / 'a.png'}") == png(1)
    assert read_uri("a.png", root=tmp_path) == png(1)
    with pytest.raises(FileNotFoundError):
        read_uri(str(tmp_path / "gone.png"))


def test_tar_members_by_name(tmp_path: Path) -> None:
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as archive:
        for i, name in enumerate(["x/00.png", "x/00.txt", "x/01.png"]):
            data = png(i) if name.endswith(".png") else b"caption"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    assert read_uri(tar_uri("x/01.png", shard)) == png(2)
    assert read_uri(tar_uri("x/00.png", shard)) == png(0)
    with pytest.raises(FileNotFoundError, match="no member 'x/02.png'"):
        read_uri(tar_uri("x/02.png", shard))
    with pytest.raises(FileNotFoundError, match="no such tar shard"):
        read_uri(tar_uri("x/00.png", tmp_path / "gone.tar"))


def test_table_cells_across_row_groups_binary_and_hf_structs(tmp_path: Path) -> None:
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "raw": pa.array([png(i) for i in range(7)], pa.binary()),
            "hf": pa.array([{"bytes": png(10 + i), "path": f"{i}.png"} for i in range(7)], struct),
        }
    )
    path = tmp_path / "images.parquet"
    pq.write_table(table, path, row_group_size=3)
    assert [read_uri(table_uri(path, "raw", row)) for row in range(7)] == [png(i) for i in range(7)]
    assert read_uri(table_uri(path, "hf", 5)) == png(15)
    with pytest.raises(ValueError, match="past the table's 7 rows"):
        read_uri(table_uri(path, "raw", 7))
    with pytest.raises(ValueError, match="no column 'nope'"):
        read_uri(table_uri(path, "nope", 0))
    with pytest.raises(ValueError, match="a table uri is"):
        read_uri(f"{path}#row=1")


def test_the_trainer_reads_every_kind_and_names_each_failure(tmp_path: Path) -> None:
    images = pa.array([png(3), b"not an image"], pa.binary())
    pq.write_table(pa.table({"image": images}), tmp_path / "t.parquet")
    assert load_image(table_uri(tmp_path / "t.parquet", "image", 0), tmp_path).size == (32, 32)
    expected = {
        table_uri(tmp_path / "t.parquet", "image", 1): "undecodable image",
        "gone.png": "missing image file",
        "https://example.com/a.png": "unsupported image uri",
        "": "missing image uri",
    }
    for uri, reason in expected.items():
        with pytest.raises(SampleError) as failure:
            load_image(uri, tmp_path)
        assert failure.value.reason == reason, uri


def test_relative_to_a_root_and_read_back_against_it(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "sub" / "a.png").write_bytes(png(1))
    with tarfile.open(corpus / "s.tar", "w") as archive:
        info = tarfile.TarInfo("m.png")
        info.size = len(png(2))
        archive.addfile(info, io.BytesIO(png(2)))
    pq.write_table(pa.table({"image": pa.array([png(3)], pa.binary())}), corpus / "t.parquet")
    uris = pa.array(
        [
            str(corpus / "sub" / "a.png"),
            f"file://{corpus / 'sub' / 'a.png'}",
            tar_uri("m.png", corpus / "s.tar"),
            table_uri(corpus / "t.parquet", "image", 0),
            str(tmp_path / "elsewhere.png"),
            None,
        ]
    )
    relative = relative_to(uris, corpus)
    assert relative.to_pylist() == [
        "sub/a.png",
        "sub/a.png",
        "tar://m.png::s.tar",
        "t.parquet#column=image&row=0",
        str(tmp_path / "elsewhere.png"),
        None,
    ]
    moved = tmp_path / "published"
    corpus.rename(moved)  # the images travel; relative uris follow them
    assert [read_uri(u, moved) for u in relative.to_pylist()[:4]] == [png(1), png(1), png(2), png(3)]
