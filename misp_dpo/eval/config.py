"""`EvalConfig`: how the models are run (batching, generation length, device); what is evaluated is
named by the caller (probes table, preference table, model and adapter)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from misp_dpo.config import option


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Generation and scoring settings shared by the base and the trained model."""

    batch_size: int = option(16, "probes (or preference sequences) per forward pass", hashed=False)
    max_new_tokens: int = option(
        16, "tokens generated per answer (greedy); POPE parses only the first sentence"
    )
    limit: int = option(0, "evaluate only the first N probes of each split and N preference pairs (0: all)")
    precision: Literal["auto", "fp32", "bf16"] = option(
        "auto", "weights dtype; auto: bf16 on GPU, fp32 on CPU"
    )
    device: Literal["auto", "cpu", "cuda"] = option("auto", "where the model runs", hashed=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.limit < 0:
            raise ValueError(
                f"need batch_size >= 1, max_new_tokens >= 1 and limit >= 0, got {self.batch_size}, "
                f"{self.max_new_tokens}, {self.limit}"
            )
