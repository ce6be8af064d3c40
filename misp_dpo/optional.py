"""The optional extras, imported only where they are used, with the exact `pip install` line when missing.

Mining needs none of them: `train` (transformers, peft) trains and evaluates VLMs, `ray` runs stages on
a Ray cluster, and retrieval needs FAISS from exactly one of `cpu` and `gpu` (the candidates stage says
which to install). Install layers are declared in pyproject.toml; this module is the one place that
turns a missing one into a one-line UserError (datatrove's `utils/_import_utils.py` habit). A function
imports an extra's package after `require` or through `import_extra` / `import_faiss`; everything
else is imported at module level (tests/test_import_boundaries.py checks both).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from misp_dpo.errors import UserError

EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("transformers", "peft"),
    "ray": ("ray",),
}
FAISS_HINT = "pip install 'misp-dpo[cpu]' (faiss-cpu), or 'misp-dpo[gpu]' (faiss-gpu-cu12) on NVIDIA GPUs"


def install_hint(extra: str) -> str:
    return f"pip install 'misp-dpo[{extra}]'"


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a finder that refuses the module, or a half-removed package
        return True


def require(extra: str, purpose: str) -> None:
    """Raise a UserError naming the extra to install when any package of `extra` is missing."""
    missing = [module for module in EXTRAS[extra] if _missing(module)]
    if missing:
        raise UserError(f"{purpose} needs {', '.join(missing)}: {install_hint(extra)}")


def import_extra(module: str, extra: str, purpose: str) -> ModuleType:
    """`module` (a package of `extra`), or a UserError with the install line."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{purpose} needs {module}: {install_hint(extra)}") from None


def import_faiss(purpose: str = "the candidates stage") -> ModuleType:
    """FAISS from faiss-cpu or faiss-gpu-cu12 (both install the module `faiss`)."""
    try:
        return importlib.import_module("faiss")
    except ImportError:
        raise UserError(f"{purpose} needs FAISS: {FAISS_HINT}") from None
