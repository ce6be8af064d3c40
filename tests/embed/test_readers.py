"""Readers: pairs tables in three formats, HF image structs, folders, corpus tables and tar shards."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from misp_dpo.embed.pairs import PairColumns, open_pairs
from misp_dpo.embed.readers import (
    FolderCorpus,
    TableCorpus,
    TarCorpus,
    expand_braces,
    open_corpus,
    open_table,
)
from misp_dpo.errors import UserError
from tests.embed.images import pairs_rows, png, write_pairs, write_pngs, write_tar


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_pairs_table_formats_read_the_same_rows_by_range(tmp_path: Path, suffix: str) -> None:
    write_pngs(tmp_path / "img", [f"{i}.png" for i in range(20)])
    columns = pairs_rows([f"img/{i}.png" for i in range(20)])
    columns["prompt"][3] = "42"  # a number-like prompt stays text in CSV
    pairs = open_pairs(write_pairs(tmp_path / f"pairs{suffix}", columns), PairColumns())
    assert pairs.num_rows == 20 and pairs.has_rejected and not pairs.has_id
    batches = list(pairs.iter_rows(5, 18, batch_size=4))
    assert [len(b.images) for b in batches] == [4, 4, 4, 1]
    text = pa.Table.from_batches([b.text for b in batches])
    assert text.column("pair_id").to_pylist()[0] == "row-000000005"
    assert text.column("prompt").to_pylist() == columns["prompt"][5:18]
    refs = [r for b in batches for r in b.images]
    assert refs[0] is not None and refs[0].path == str((tmp_path / "img/5.png").absolute())
    assert refs[0].read() == (tmp_path / "img/5.png").read_bytes()


def test_pairs_columns_are_remapped_and_ids_cast_to_text(tmp_path: Path) -> None:
    write_pngs(tmp_path, ["a.png"])
    table = {"q": ["what?"], "good": ["yes"], "pic": ["a.png"], "key": [7]}
    pairs = open_pairs(
        write_pairs(tmp_path / "p.parquet", table),
        PairColumns(prompt="q", chosen="good", image="pic", id="key"),
    )
    (rows,) = pairs.iter_rows(0, 1, 8)
    assert rows.text.to_pylist() == [{"pair_id": "7", "prompt": "what?", "chosen": "yes", "rejected": None}]


def test_missing_required_column_names_the_flag(tmp_path: Path) -> None:
    path = write_pairs(tmp_path / "p.csv", {"question": ["a"], "chosen": ["b"], "image": ["x.png"]})
    with pytest.raises(UserError, match=r"no column 'prompt' .*--prompt-column"):
        open_pairs(path, PairColumns())
    with pytest.raises(UserError, match=r"no column 'answer' for --rejected-column"):
        open_pairs(path, PairColumns(prompt="question", rejected="answer"))


def test_hf_image_structs_with_bytes_or_path(tmp_path: Path) -> None:
    write_pngs(tmp_path, ["on_disk.png"], first_seed=5)
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array(
        [{"bytes": png(1), "path": "inline.png"}, {"bytes": None, "path": "on_disk.png"}, None], struct
    )
    pq.write_table(pa.table({**pairs_rows([None] * 3), "image": images}), tmp_path / "hf.parquet")
    pairs = open_pairs(tmp_path / "hf.parquet", PairColumns())
    (rows,) = pairs.iter_rows(0, 3, 8)
    inline, on_disk, missing = rows.images
    assert inline is not None and inline.read() == png(1)
    assert inline.uri == f"{tmp_path / 'hf.parquet'}#column=image&row=0", "its cell, not its file name"
    assert on_disk is not None and on_disk.read() == png(5) and on_disk.uri.endswith("on_disk.png")
    assert missing is None


def test_image_column_of_the_wrong_type_is_refused(tmp_path: Path) -> None:
    pq.write_table(pa.table({**pairs_rows([1, 2])}), tmp_path / "p.parquet")
    with pytest.raises(UserError, match="column 'image' is int64"):
        open_pairs(tmp_path / "p.parquet", PairColumns())


def test_unreadable_table_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "p.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="not readable as parquet"):
        open_table(tmp_path / "p.parquet", "--pairs")
    with pytest.raises(UserError, match="not a table"):
        open_table(tmp_path / "p.txt", "--pairs")


def test_folder_corpus_is_recursive_sorted_and_skips_other_files(tmp_path: Path) -> None:
    write_pngs(tmp_path / "c", ["b/2.png", "a.JPG", "b/1.webp", "c/d/3.png"])
    (tmp_path / "c" / "notes.txt").write_text("x")
    (tmp_path / "c" / ".hidden.png").write_bytes(png(9))
    corpus = open_corpus(str(tmp_path / "c"), "image")
    assert isinstance(corpus, FolderCorpus) and corpus.skipped == 1
    assert corpus.paths.to_pylist() == ["a.JPG", "b/1.webp", "b/2.png", "c/d/3.png"]
    refs = [r for batch in corpus.iter_refs(1, 4, 2) for r in batch]
    assert [Path(r.uri).name for r in refs if r is not None] == ["1.webp", "2.png", "3.png"]


def test_table_corpus_reads_its_image_column(tmp_path: Path) -> None:
    write_pngs(tmp_path / "img", ["x.png", "y.png"])
    write_pairs(tmp_path / "corpus.jsonl", {"file": ["img/x.png", "img/y.png"]})
    with pytest.raises(UserError, match="--corpus-image-column"):
        open_corpus(str(tmp_path / "corpus.jsonl"), "image")
    corpus = open_corpus(str(tmp_path / "corpus.jsonl"), "file")
    assert isinstance(corpus, TableCorpus) and corpus.num_items == 2
    refs = [r for batch in corpus.iter_refs(0, 2, 8) for r in batch]
    expected = [(tmp_path / "img" / name).read_bytes() for name in ("x.png", "y.png")]
    assert [r.read() for r in refs if r is not None] == expected


def test_webdataset_tars_by_file_folder_glob_and_braces(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(3):
        write_tar(
            shards / f"shard-{s:03d}.tar",
            {f"{s}{k}.jpg": png(10 * s + k) for k in range(2)}
            | {f"{s}0.json": b"{}", f"{s}1.txt": b"caption"},
        )
    for spec in [str(shards), str(shards / "*.tar"), str(shards / "shard-{000..002}.tar")]:
        corpus = open_corpus(spec, "image")
        assert isinstance(corpus, TarCorpus) and corpus.num_items == 6, spec
    single = open_corpus(str(shards / "shard-001.tar"), "image")
    assert single.num_items == 2
    refs = [r for batch in corpus.iter_refs(1, 5, 3) for r in batch]
    assert [r.read() for r in refs if r is not None] == [png(1), png(10), png(11), png(20)]
    assert refs[0] is not None and refs[0].uri == f"tar://01.jpg::{shards / 'shard-000.tar'}"


def test_brace_expansion_and_bad_patterns(tmp_path: Path) -> None:
    assert expand_braces("s-{08..10}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar"]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    with pytest.raises(UserError, match="must match .tar shards"):
        open_corpus(str(tmp_path / "*.tar"), "image")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image files"):
        open_corpus(str(tmp_path / "empty"), "image")
