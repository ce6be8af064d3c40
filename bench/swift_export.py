"""ms-swift's own dataset preprocessing on `publish --format swift` output (not a test: ms-swift pins
older transformers/peft/datasets than this project, so it runs from a venv of its own).

    python -m venv /tmp/swiftenv && /tmp/swiftenv/bin/pip install ms-swift==4.5.2   # with its pins
    /tmp/swiftenv/bin/python bench/swift_export.py

Publishes a tiny negatives folder (real PNGs, ids = sha1 of the bytes) with `--format swift`, loads
each config with `datasets`, runs ms-swift's `AutoPreprocessor` on it (the path `swift rlhf
--rlhf_type dpo --dataset DIR/data/...` takes), and prints what comes out: row counts, the keys of
a row, and whether the images survive as `{bytes, path}`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import datasets
    import swift
    from swift.dataset.preprocessor import AutoPreprocessor

    from misp_dpo.mining.publish import PublishSettings
    from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
    from misp_dpo.pipelines.stages.publish import PublishConfig, PublishStage
    from tests.helpers import write_prewritten
    from tests.publish.fixtures import negatives_table

    root = Path(tempfile.mkdtemp(prefix="swift-export-"))
    table = negatives_table(root / "corpus")
    write_prewritten(root / "neg", "mine", {"train": table}, meta={"strategy": "misp", "format": "listwise"})
    cfg = PublishConfig(
        out=root / "hub",
        negatives=root / "neg",
        image_root=root / "corpus",
        settings=PublishSettings(format="swift"),
    )
    run_stage(PublishStage(), cfg, RunOptions())
    print(f"ms-swift {swift.__version__}, datasets {datasets.__version__}")
    for config in ("rejected_images", "rejected_response"):
        files = sorted(str(p) for p in (root / "hub" / "data").glob(f"{config}-*.parquet"))
        raw = datasets.load_dataset("parquet", data_files=files, split="train")
        out = AutoPreprocessor()(raw, num_proc=1, strict=True, load_from_cache_file=False)
        row = out[0]
        images = row.get("images") or []
        rejected = row.get("rejected_images") or []
        print(
            f"{config}: {len(raw)} rows in, {len(out)} rows out; keys {sorted(row)}; "
            f"images {[sorted(i) for i in images]}; rejected_images {len(rejected)}; "
            f"messages {[m['role'] for m in row['messages']]}; "
            f"rejected_response {row.get('rejected_response')!r}"
        )
    # The control: one table holding both kinds of rows gives image rows a null rejected_response.
    merged = datasets.concatenate_datasets(
        [
            datasets.load_dataset("parquet", data_files=str(f), split="train").remove_columns(
                [c for c in ("rank", "score", "proposal") if "rejected_images" in f.name]
            )
            for f in sorted((root / "hub" / "data").glob("*.parquet"))
        ]
    )
    try:
        kept = AutoPreprocessor()(merged, num_proc=1, strict=True, load_from_cache_file=False)
        print(f"one merged table: {len(merged)} rows in, {len(kept)} out")
    except Exception as error:  # noqa: BLE001 -- reporting what ms-swift does, whatever it raises
        print(f"one merged table: refused ({type(error).__name__}: {str(error)[:120]})")


if __name__ == "__main__":
    main()
