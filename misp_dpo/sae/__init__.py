"""The sparse autoencoders (docs/method.md): the paper's fused-difference SAE and a TopK variant.

Mining uses `load_sae(folder).encode_pools(...)`; the `sae` stage trains through `train_sae`.
"""

from misp_dpo.sae.checkpoint import SaeSpec
from misp_dpo.sae.encoder import DifferenceEncoder, PoolCodes, load_sae

__all__ = ["DifferenceEncoder", "PoolCodes", "SaeSpec", "load_sae"]
