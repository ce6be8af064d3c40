from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from misp_dpo.row_ranges import read_parquet_range, slice_rows


def test_every_range_of_a_file_with_several_row_groups(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"x": list(range(30)), "y": [str(i) for i in range(30)]}), path, row_group_size=7)
    assert pq.ParquetFile(path).metadata.num_row_groups == 5
    for lo in range(0, 31, 3):
        for hi in range(lo, 32, 4):
            batches = list(read_parquet_range(path, lo, hi, ["x"], batch_size=4))
            got = [v for b in batches for v in b.column(0).to_pylist()]
            assert got == list(range(lo, min(hi, 30))), (lo, hi)
            assert all(b.schema.names == ["x"] and 0 < b.num_rows <= 4 for b in batches)


def test_slice_rows_stops_reading_once_the_range_is_served() -> None:
    pulled = []

    def stream():  # type: ignore[no-untyped-def]
        for start in range(0, 100, 10):
            pulled.append(start)
            yield pa.record_batch({"x": list(range(start, start + 10))})

    rows = [v for b in slice_rows(stream(), 15, 32) for v in b.column(0).to_pylist()]
    assert rows == list(range(15, 32))
    assert pulled == [0, 10, 20, 30]
