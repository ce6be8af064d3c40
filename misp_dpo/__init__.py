"""misp-dpo: multi-negative preference datasets for vision-language models (MISP-DPO, arXiv 2509.25717)."""

__version__ = "0.1.0"
