"""Install layers: mining runs without the `train` extra, and a missing extra names its pip install line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import misp_dpo

STAGES_DIR = Path(misp_dpo.__file__).parent / "pipelines" / "stages"

# Run first in a fresh interpreter: `import X` for a blocked top-level package raises as if not installed.
BLOCKER = """
import importlib.abc, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, Blocked())
"""


def run_without(blocked: tuple[str, ...], body: str) -> subprocess.CompletedProcess[str]:
    script = f"BLOCKED = {blocked!r}\n{BLOCKER}\n{textwrap.dedent(body)}"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)


@pytest.mark.slow  # 16 s on a loaded machine: a fresh interpreter imports every stage
def test_every_stage_module_and_mine_help_import_without_transformers_and_peft() -> None:
    modules = sorted(
        f"misp_dpo.pipelines.stages.{p.stem}" for p in STAGES_DIR.glob("*.py") if p.stem != "__init__"
    )
    assert {"misp_dpo.pipelines.stages.embed", "misp_dpo.pipelines.stages.mine"} <= set(modules)
    result = run_without(
        ("transformers", "peft"),
        f"""
        import importlib
        try:
            import transformers
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit("the blocker let transformers through")
        for name in {modules!r}:
            importlib.import_module(name)
        from misp_dpo.pipelines.stages import STAGES
        assert {{"embed", "candidates", "sae", "mine", "report"}} <= set(STAGES), sorted(STAGES)
        from misp_dpo.cli import main
        try:
            main(["mine", "--help"])
        except SystemExit as done:
            assert done.code == 0, done.code
        loaded = sorted(m for m in sys.modules if m.partition(".")[0] in ("transformers", "peft"))
        assert not loaded, loaded
        from misp_dpo.errors import UserError
        from misp_dpo.optional import require
        try:
            require("train", "misp-dpo train")
        except UserError as error:
            print("HINT", error)
        """,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--negatives" in result.stdout  # mine's help was printed
    hint = next(line for line in result.stdout.splitlines() if line.startswith("HINT "))
    assert hint == "HINT misp-dpo train needs transformers, peft: pip install 'misp-dpo[train]'"


def test_retrieval_without_faiss_names_the_extra_in_one_line() -> None:
    result = run_without(
        ("faiss",),
        """
        from misp_dpo.errors import UserError
        from misp_dpo.mining.index import import_faiss
        try:
            import_faiss()
        except UserError as error:
            print(error)
        """,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == (
        "the candidates stage needs FAISS: pip install 'misp-dpo[cpu]' (faiss-cpu), "
        "or 'misp-dpo[gpu]' (faiss-gpu-cu12) on NVIDIA GPUs\n"
    )
