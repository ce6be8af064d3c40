"""Score histograms of a negatives dataset, as small PNGs for the dataset card and the report.

Values are gathered column-wise from the `negatives` lists (or pairwise rows) while streaming the
shards; only the per-negative float fields are kept in memory (a few float32 arrays).
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

HISTOGRAM_FIELDS: dict[str, str] = {
    "score": "score s_i",
    "recon_error": "reconstruction difficulty l_i",
    "deviation": "semantic deviation v_i = |z_i|_1",
    "diversity_gain": "diversity gain at pick time",
    "sim_image": "cosine to the positive image",
    "proposal": "proposal q_i",
}


def gather_fields(batches: Iterable[pa.RecordBatch]) -> dict[str, np.ndarray]:
    """Non-null values of each histogram field over every negative of the streamed batches."""
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in HISTOGRAM_FIELDS}
    for batch in batches:
        names = batch.schema.names
        if "negatives" in names:
            flat = pc.list_flatten(batch.column(names.index("negatives")))
            columns = {name: flat.field(name) for name in HISTOGRAM_FIELDS}
        else:
            columns = {name: batch.column(names.index(name)) for name in HISTOGRAM_FIELDS if name in names}
        for name, column in columns.items():
            values = column.drop_null().to_numpy(zero_copy_only=False)
            chunks[name].append(values.astype(np.float32, copy=False))
    return {name: np.concatenate(parts) for name, parts in chunks.items() if parts and sum(map(len, parts))}


def render_histograms(values: dict[str, np.ndarray], prefix: str = "hist-") -> dict[str, bytes]:
    """One small PNG per field, as {`hist-score.png`: bytes, ...}; the caller writes them.

    Uses the Agg canvas directly (no pyplot state, no global backend switch), so it works headless,
    in worker processes, and leaves an importer's matplotlib backend alone.
    """
    images = {}
    for name, data in values.items():
        figure = Figure(figsize=(4.0, 2.8), dpi=100)
        FigureCanvasAgg(figure)
        axis = figure.subplots()
        axis.hist(data, bins=40, color="#4c72b0")
        axis.set_title(f"{HISTOGRAM_FIELDS[name]} ({len(data)} negatives)", fontsize=10)
        axis.set_xlabel(f"{HISTOGRAM_FIELDS[name]} (field {name})", fontsize=9)
        axis.set_ylabel("number of negatives", fontsize=9)
        axis.tick_params(labelsize=8)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", metadata={"Software": None})
        images[f"{prefix}{name}.png"] = buffer.getvalue()
    return images


def summary(values: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """mean / min / max of each field, for the card's and the report's tables."""
    return {
        name: {"mean": float(data.mean()), "min": float(data.min()), "max": float(data.max())}
        for name, data in values.items()
    }
