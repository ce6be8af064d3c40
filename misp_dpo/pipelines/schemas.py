"""Every on-disk Parquet schema, declared once, with its name and version in the file metadata.

Writers cast to these schemas (never infer from the first row); readers check the name so that a
folder from another stage, or from an incompatible version, is refused with a clear message.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_KEY = b"misp_dpo.schema"


def _named(name: str, version: int, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={SCHEMA_KEY: f"{name}/{version}".encode()})


def schema_id(schema: pa.Schema) -> str | None:
    """`name/version` from a schema's metadata, or None for files not written by misp-dpo."""
    metadata = schema.metadata or {}
    value = metadata.get(SCHEMA_KEY)
    return value.decode() if value else None


def vector(dim: int) -> pa.DataType:
    """CLIP embeddings: L2-normalised, stored as float16 (half the bytes, ~1e-3 relative error)."""
    return pa.list_(pa.float16(), dim)


FAILURES = _named(
    "failures",
    1,
    [
        pa.field("item", pa.string(), nullable=False),  # the file, or `table.parquet row 12`, that failed
        pa.field("reason", pa.string(), nullable=False),  # a short class: "undecodable image", "empty prompt"
        pa.field("detail", pa.string()),  # the underlying message
    ],
)

# The input pairs table as `synth` writes it (user tables may differ and are remapped by flags).
PAIRS_INPUT = _named(
    "pairs_input",
    1,
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string()),
        pa.field("image", pa.string(), nullable=False),  # path relative to the table
    ],
)


def synth_attributes(attribute_names: list[str]) -> pa.Schema:
    fields = [pa.field("image", pa.string(), nullable=False)]
    fields += [pa.field(name, pa.string(), nullable=False) for name in attribute_names]
    return _named("synth_attributes", 1, fields)


# The demo world's POPE probes on its held-out images (docs/method.md §5 "probes").
SYNTH_PROBES = _named(
    "synth_probes",
    1,
    [
        pa.field("image", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),  # yes | no
        pa.field("category", pa.string(), nullable=False),  # random | popular | adversarial
        pa.field("attribute", pa.string(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
    ],
)

# The demo world's held-out preference pairs: each negative differs from the positive in one attribute.
SYNTH_HELDOUT_PAIRS = _named(
    "synth_heldout_pairs",
    2,
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string()),
        pa.field("image", pa.string(), nullable=False),  # the positive, relative to the table
        pa.field("negatives", pa.list_(pa.string()), nullable=False),  # one per attribute type
        pa.field("negative_kinds", pa.list_(pa.string()), nullable=False),  # the attribute each differs in
    ],
)


def images(dim: int) -> pa.Schema:
    return _named(
        "images",
        1,
        [
            pa.field("image_id", pa.string(), nullable=False),  # sha1 of the image bytes
            pa.field("uri", pa.string(), nullable=False),
            pa.field("embedding", vector(dim), nullable=False),
        ],
    )


def pair_embeddings(dim: int) -> pa.Schema:
    return _named(
        "pairs",
        1,
        [
            pa.field("pair_id", pa.string(), nullable=False),
            pa.field("prompt", pa.string(), nullable=False),
            pa.field("chosen", pa.string(), nullable=False),
            pa.field("rejected", pa.string()),
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("prompt_embedding", vector(dim), nullable=False),
            pa.field("chosen_embedding", vector(dim), nullable=False),
        ],
    )


CANDIDATE = pa.struct(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("sim_image", pa.float32(), nullable=False),  # cosine to the positive image
        pa.field("sim_prompt", pa.float32(), nullable=False),  # cosine to the prompt
        pa.field("rank", pa.int32(), nullable=False),  # 0 = most similar to the positive after filtering
    ]
)

CANDIDATES = _named(
    "candidates",
    1,
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("candidates", pa.list_(CANDIDATE), nullable=False),
    ],
)

IMAGE_REF = pa.struct([pa.field("image_id", pa.string(), nullable=False), pa.field("uri", pa.string())])

NEGATIVE = pa.struct(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string()),
        pa.field("rank", pa.int32(), nullable=False),  # pick order of the selection (0 = first)
        pa.field("sim_image", pa.float32()),
        pa.field("sim_prompt", pa.float32()),
        pa.field("recon_error", pa.float32()),  # l_i
        pa.field("deviation", pa.float32()),  # v_i
        pa.field("diversity_gain", pa.float32()),
        pa.field("score", pa.float32()),  # s_i
        pa.field("proposal", pa.float32()),  # q_i over the pair's whole pool
    ]
)

# The published dataset's shards are `train-NNNNN.parquet`: the split keyword in the name is how
# `datasets.load_dataset("parquet", data_dir=DIR)` (and the Hugging Face Hub) tells data files from
# the manifest, stats and histograms next to them, which it would otherwise try to read as Parquet.
NEGATIVES_SHARD_PREFIX = "train"

NEGATIVES = _named(
    "negatives",
    1,
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string()),
        pa.field("positive", IMAGE_REF, nullable=False),
        pa.field("negatives", pa.list_(NEGATIVE), nullable=False),
    ],
)

# `mine --format pairwise`: one row per (positive, negative) for trainers that take one rejected image.
NEGATIVES_PAIRWISE = _named(
    "negatives_pairwise",
    1,
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string()),
        pa.field("image", IMAGE_REF, nullable=False),
        pa.field("rejected_image", IMAGE_REF, nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("score", pa.float32()),
        pa.field("proposal", pa.float32()),
    ],
)

# Reference log-probs, computed once before training (docs/method.md §4).
REFERENCE_LOGPS = _named(
    "reference_logps",
    1,
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("response", pa.string(), nullable=False),  # "chosen" | "rejected"
        pa.field("logp", pa.float64(), nullable=False),  # summed token log-probs of the response
    ],
)
