"""The mined dataset as the trainer sees it: the Arrow table of pairs, their proposals, their images.

Rows stay in Arrow (a step converts only its own few rows to Python); proposals and negative counts
come out of the list column's flat values and offsets as numpy arrays, without Python loops.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from misp_dpo.dpo.sampling import FEATURES
from misp_dpo.errors import in_words
from misp_dpo.image_uris import read_uri

REQUIRED_COLUMNS = ("pair_id", "prompt", "chosen", "rejected", "positive", "negatives")


class SampleError(Exception):
    """A pair that cannot be used (an unreadable image, an empty prompt): `reason` is the short class
    recorded as its per-sample failure, `detail` the file or message."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ImageRef:
    image_id: str
    uri: str | None


@dataclass(frozen=True)
class PairRecord:
    """One pair with its negatives, in stored order."""

    row: int
    pair_id: str
    prompt: str
    chosen: str
    rejected: str | None
    positive: ImageRef
    negatives: tuple[ImageRef, ...]


def load_image(uri: str | None, root: Path) -> Image.Image:
    """Open a uri as `embed` records it (`misp_dpo.image_uris`: a file path, absolute or relative to
    the dataset folder `root`, a tar:// member or a table cell). A missing, unreadable or undecodable
    image raises `SampleError`: a per-sample failure."""
    if not uri:
        raise SampleError("missing image uri", "the row has no uri for this image")
    try:
        data = read_uri(uri, root)
    except FileNotFoundError as error:
        raise SampleError("missing image file", in_words(error)) from None
    except ValueError as error:
        raise SampleError("unsupported image uri", in_words(error)) from None
    except OSError as error:
        raise SampleError("unreadable image", f"{type(error).__name__}: {in_words(error)}") from None
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except OSError as error:
        raise SampleError("undecodable image", f"{uri}: {in_words(error)}") from None


class PreferenceData:
    """A `negatives/` table (schema NEGATIVES) and the folder its relative uris are resolved against."""

    def __init__(self, table: pa.Table, root: Path) -> None:
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(f"negatives table lacks column(s) {missing}")
        self.table = table
        self.root = root
        negatives = table.column("negatives")
        self.counts = pc.list_value_length(negatives).to_numpy(zero_copy_only=False).astype(np.int64)
        self.max_negatives = int(self.counts.max(initial=0))
        self.proposals = self._padded(negatives, "proposal")
        present = {f.name for f in negatives.type.value_type}
        self.fields = np.stack(  # (P, N_max, F) the mined fields a fitted proposal reads
            [
                self._padded(negatives, name) if name in present else self.proposals * np.nan
                for name in FEATURES
            ],
            axis=2,
        )

    def _padded(self, negatives: pa.ChunkedArray, name: str) -> np.ndarray:
        """(P, N_max) float64 of one negative field, NaN where a pair has fewer negatives or a null."""
        out = np.full((len(self.counts), self.max_negatives), np.nan)
        flat = pc.struct_field(pc.list_flatten(negatives), name)
        values = flat.cast(pa.float64()).to_numpy(zero_copy_only=False)
        pair = np.repeat(np.arange(len(self.counts)), self.counts)
        starts = np.cumsum(self.counts) - self.counts
        out[pair, np.arange(len(pair)) - np.repeat(starts, self.counts)] = values
        return out

    def __len__(self) -> int:
        return self.table.num_rows

    def records(self, rows: np.ndarray | list[int]) -> list[PairRecord]:
        """The given rows as records; only these rows are converted to Python."""
        rows = [int(r) for r in rows]
        chunk = self.table.take(pa.array(rows, pa.int64())).to_pylist()
        return [
            PairRecord(
                row=row,
                pair_id=item["pair_id"],
                prompt=item["prompt"],
                chosen=item["chosen"],
                rejected=item["rejected"] or None,
                positive=ImageRef(item["positive"]["image_id"], item["positive"]["uri"]),
                negatives=tuple(ImageRef(n["image_id"], n["uri"]) for n in item["negatives"]),
            )
            for row, item in zip(rows, chunk, strict=True)
        ]
