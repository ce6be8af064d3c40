"""`misp-dpo publish`: a negatives folder becomes a Hub folder that `datasets` loads with its images."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from misp_dpo.errors import UserError
from misp_dpo.mining.publish import PublishSettings
from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
from misp_dpo.pipelines.stages.publish import PublishConfig, PublishStage
from tests.helpers import write_prewritten
from tests.publish.fixtures import negatives_table

# Any absolute path: a POSIX root folder or a file URI anywhere; a Windows drive in text files.
ABSOLUTE = re.compile(rb"(?<![\w.])/(?:home|tmp|work|root|usr|var|mnt|opt|srv|data|Users)\b|file:/")
WINDOWS = re.compile(rb"\b[A-Za-z]:\\{1,2}[A-Za-z]")
MINE_META = {
    "strategy": "misp",
    "negatives": 3,
    "format": "listwise",
    "clip": {"model": "local-dir:/tmp/clip", "dim": 8},
    "sae": {"variant": "paper", "latents": 16, "dir": "/tmp/run/sae"},
    "candidates_dir": "/tmp/run/candidates",
}


def negatives_folder(root: Path) -> Path:
    """A `mine` output whose uris are relative to root/corpus (mine --uri-root)."""
    table = negatives_table(root / "corpus")
    write_prewritten(root / "neg", "mine", {"train": table}, tasks=2, meta=MINE_META)
    return root / "neg"


def assert_portable(folder: Path) -> None:
    """No absolute path in any file's bytes, nor in any decoded Parquet value or schema metadata
    (Parquet pages are compressed, so their bytes alone would hide one)."""
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        found = ABSOLUTE.search(data) or (WINDOWS.search(data) if path.suffix in (".md", ".json") else None)
        assert found is None, f"{path.relative_to(folder)} holds {found.group(0)!r}"
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            text = json.dumps(table.to_pylist(), default=lambda b: "").encode()
            text += json.dumps(
                {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
            ).encode()
            found = ABSOLUTE.search(text) or WINDOWS.search(text)
            assert found is None, f"{path.relative_to(folder)} holds {found.group(0)!r}"


def test_published_folder_loads_with_its_images_and_no_absolute_path(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    negatives = negatives_folder(tmp_path)
    out = tmp_path / "hub"
    cfg = PublishConfig(out=out, negatives=negatives, image_root=tmp_path / "corpus", tasks=2)
    manifest = run_stage(PublishStage(), cfg, RunOptions())
    assert manifest is not None and manifest.stats["pairs"] == 5 and manifest.stats.get("failures", 0) == 0
    assert sorted(p.name for p in (out / "data").iterdir()) == ["train-00000.parquet", "train-00001.parquet"]
    assert (out / "hist-score.png").stat().st_size > 1000
    card = (out / "README.md").read_text()
    assert "license: other" in card and "pretty_name:" in card and "dataset_info:" in card
    assert "num_examples: 5" in card and "num_bytes: " in card and "dtype: image" in card
    assert "w_l = 1, w_v = 1, relevance R = 0" in card
    for ds in (
        datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "c1")),
        datasets.load_dataset("parquet", data_dir=str(out), split="train", cache_dir=str(tmp_path / "c2")),
    ):
        assert len(ds) == 5
        for row in ds:
            assert row["positive"].size == (24, 24)
            assert all(n["image"].size == (24, 24) for n in row["negatives"])
            assert hashlib.sha1(row["positive"].tobytes()).hexdigest()  # decoded pixels
    raw = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "c3"))
    raw = raw.cast_column("positive", datasets.Image(decode=False))
    for row in raw:
        assert hashlib.sha1(row["positive"]["bytes"]).hexdigest() == row["positive_id"]
    assert_portable(out)
    assert ABSOLUTE.search((negatives / "manifest.json").read_bytes())  # the check does see paths


def test_swift_and_trl_folders(tmp_path: Path) -> None:
    negatives = negatives_folder(tmp_path)
    for fmt, names in (
        ("swift", ["rejected_images-00000.parquet", "rejected_response-00000.parquet"]),
        ("trl", ["train-00000.parquet"]),
    ):
        out = tmp_path / fmt
        cfg = PublishConfig(
            out=out, negatives=negatives, image_root=tmp_path / "corpus", settings=PublishSettings(format=fmt)
        )
        manifest = run_stage(PublishStage(), cfg, RunOptions())
        assert manifest is not None and sorted(p.name for p in (out / "data").iterdir()) == names
        assert_portable(out)
    assert "config_name: rejected_images" in (tmp_path / "swift" / "README.md").read_text()


def test_a_moved_image_is_a_counted_failure(tmp_path: Path) -> None:
    negatives = negatives_folder(tmp_path)
    (tmp_path / "corpus" / "images" / "7.png").write_bytes(b"not the mined image")
    cfg = PublishConfig(out=tmp_path / "hub", negatives=negatives, image_root=tmp_path / "corpus")
    with pytest.raises(UserError, match="failed"):
        run_stage(PublishStage(), cfg, RunOptions())
    manifest = run_stage(PublishStage(), cfg, RunOptions(max_failure_rate=0.5))
    assert (
        manifest is not None and manifest.stats["failures"] == 1 and manifest.stats["dropped_pairs"] == 1
    )  # pair 4


def test_dry_run_lists_the_upload_and_sends_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    negatives = negatives_folder(tmp_path)
    out = tmp_path / "hub"
    cfg = PublishConfig(
        out=out, negatives=negatives, image_root=tmp_path / "corpus", repo_id="someone/tiny", dry_run=True
    )
    from misp_dpo.mining.hub import uploaded_files

    run_stage(PublishStage(), cfg, RunOptions())
    files = [name for name, _ in uploaded_files(out)]
    assert "README.md" in files and "data/train-00000.parquet" in files and "hist-score.png" in files
    assert not any(name.startswith("_") or name == "manifest.json" for name in files)
    with pytest.raises(UserError, match="dry_run"):
        from misp_dpo.config import build_config

        build_config(PublishConfig, {"out": out, "negatives": negatives, "dry_run": True})


def test_cli_publish_with_positional_folder_and_dry_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from misp_dpo.cli import main

    negatives = negatives_folder(tmp_path)
    out = tmp_path / "hub"
    argv = ["publish", str(negatives), "--out", str(out), "--image-root", str(tmp_path / "corpus")]
    with pytest.raises(SystemExit) as done:
        main([*argv, "--format", "trl", "--repo-id", "someone/tiny", "--dry-run", "--log-format", "json"])
    assert done.value.code == 0
    err = capsys.readouterr().err
    assert "would upload data/train-00000.parquet" in err and '"repo_id": "someone/tiny"' in err
    assert (out / "data" / "train-00000.parquet").is_file()
    with pytest.raises(SystemExit) as done:
        main(["publish", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert done.value.code == 2
    assert "NEGATIVES" in capsys.readouterr().err


def test_upload_without_network_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from misp_dpo.mining.hub import upload

    (tmp_path / "README.md").write_text("card")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        upload(tmp_path, "someone/tiny", dry_run=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("misp_dpo.mining.hub.get_token", lambda: None)  # whatever this machine has stored
    with pytest.raises(UserError, match="no Hugging Face token"):
        upload(tmp_path, "someone/tiny", dry_run=False)


def test_a_rerun_with_repo_id_uploads_a_folder_published_before(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--repo-id added on a second run finds the folder complete; the upload (here listed) still runs."""
    from misp_dpo.cli import main

    negatives = negatives_folder(tmp_path)
    argv = [
        "publish",
        str(negatives),
        "--out",
        str(tmp_path / "hub"),
        "--image-root",
        str(tmp_path / "corpus"),
    ]
    for extra in ([], ["--repo-id", "someone/tiny", "--dry-run"]):
        with pytest.raises(SystemExit) as done:
            main([*argv, *extra, "--log-format", "json"])
        assert done.value.code == 0
    err = capsys.readouterr().err
    assert "already complete, skipping" in err and "would upload data/train-00000.parquet" in err
