"""Imports go one way: cores <- stage contract <- stages <- runtime <- cli (README: "How it works").

Every module of the package is parsed with `ast`, function-local and `TYPE_CHECKING` imports
included, so a lazy import cannot hide a wrong-way dependency. Imports sit at module level, except
those of the optional extras' packages, which a function imports after `misp_dpo.optional` has
checked them (so a missing extra is a one-line pip hint): a function-local import of anything else
fails, unless listed with its reason. The checkers are shown to catch a planted violation, a planted
circle and planted local imports on a throwaway package.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "misp_dpo"

CORES = ("embed", "sae", "mining", "dpo", "eval")
GROUND = ("config", "errors", "log", "image_uris", "row_ranges", "optional")
# the stage-contract floor: what a stage may import from pipelines/
CONTRACT = ("stage", "schemas", "io", "manifest", "pools", "embeddings", "index_files", "process_cache")
# the optional extras' packages (pyproject: train, ray, cpu/gpu; trl and datasets are the exports'
# readers) and the misp_dpo.optional calls that check one is installed before it is imported
OPTIONAL = ("transformers", "peft", "tokenizers", "trl", "datasets", "ray", "faiss")
OPTIONAL_HELPERS = ("require", "import_extra", "import_faiss")


def floor(module: str, package: str) -> str | None:
    """The floor `module` belongs to: core, contract, stages, runtime, cli, or None (the package)."""
    parts = module.split(".")[1:]
    if not parts:
        return None
    if parts[0] in CORES or parts[0] in GROUND:
        return "core"
    if parts[0] == "cli":
        return "cli"
    if parts[0] == "pipelines":
        if len(parts) == 1 or parts[1] in CONTRACT:
            return "contract"
        if parts[1] in ("stages", "runtime"):
            return parts[1]
    return "unknown"


# floor -> floors it must not import (cores <- contract <- stages <- runtime <- cli)
FORBIDDEN = {
    "core": {"contract", "stages", "runtime", "cli"},
    "contract": {"stages", "runtime", "cli"},
    "stages": {"runtime", "cli"},
    "runtime": {"stages", "cli"},
    "cli": set(),
}


def module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports(root: Path, package: str) -> dict[str, list[tuple[str, int]]]:
    """Each module of the package -> the modules it imports (anywhere in it), with line numbers.

    `from a.b import c` counts as importing `a.b.c` when that is a module of the package, else `a.b`.
    """
    paths = sorted(root.rglob("*.py"))
    modules = {module_name(p, root, package): p for p in paths}
    graph: dict[str, list[tuple[str, int]]] = {}
    for name, path in modules.items():
        found: list[tuple[str, int]] = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(alias.name, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(node, name, path.name == "__init__.py")
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.append((sub if sub in modules else target, node.lineno))
        graph[name] = found
    return graph


def violations(root: Path, package: str) -> list[str]:
    """Every import that goes the wrong way, as `file:line: a imports b (floor -> floor)`."""
    problems = []
    for module, targets in imports(root, package).items():
        mine = floor(module, package)
        where = module.replace(".", "/")
        for target, line in targets:
            if target == "tests" or target.startswith("tests."):
                problems.append(f"{where}:{line}: {module} imports {target} (test code)")
            if not target.startswith(package + ".") and target != package:
                continue
            theirs = floor(target, package)
            if mine is not None and theirs in FORBIDDEN.get(mine, set()):
                problems.append(f"{where}:{line}: {module} imports {target} ({mine} -> {theirs})")
            if mine == "unknown" or theirs == "unknown":
                problems.append(f"{where}:{line}: {module} or {target} is on no floor; name it in this test")
    return problems


def cycles(root: Path, package: str) -> list[list[str]]:
    """Import circles among the package's own modules (function-local imports included)."""
    edges = imports(root, package)
    graph = {m: sorted({t for t, _ in ts if t in edges and t != m}) for m, ts in edges.items()}
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_every_import_goes_down_a_floor() -> None:
    assert violations(PACKAGE_ROOT, "misp_dpo") == []


# circles known and owned elsewhere, to be broken by their owner; a new circle fails the test
PENDING_CIRCLES: list[list[str]] = []


def test_no_import_circle_in_the_package() -> None:
    assert [c for c in cycles(PACKAGE_ROOT, "misp_dpo") if c not in PENDING_CIRCLES] == []


def test_runtime_finds_stages_only_through_the_registry_the_cli_passes() -> None:
    graph = imports(PACKAGE_ROOT, "misp_dpo")
    stages = "misp_dpo.pipelines.stages"
    users = sorted(m for m, ts in graph.items() if any(t.startswith(stages) for t, _ in ts))
    assert all(m == "misp_dpo.cli" or m.startswith(stages) for m in users), users
    assert "misp_dpo.cli" in users


# Function-local imports kept, (file, function, imported module) -> why.
LOCAL_IMPORTS_KEPT: dict[tuple[str, str, str], str] = {
    ("misp_dpo/embed/clip.py", "open_clip_module", "open_clip"): (
        "open_clip imports timm and transformers (3-4 s), and the CLI imports every stage's config: "
        "`misp-dpo --help` would pay it; one accessor imports it on first use"
    ),
}


class _LocalImports(ast.NodeVisitor):
    """(line, innermost function, imported module, whether an optional helper was called before it)."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.module, self.is_package = module, is_package
        self.functions: list[ast.FunctionDef | ast.AsyncFunctionDef] = []
        self.found: list[tuple[int, str, str, bool]] = []

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.functions.append(node)
        self.generic_visit(node)
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self._add(node, _resolve(node, self.module, self.is_package))

    def _add(self, node: ast.Import | ast.ImportFrom, target: str) -> None:
        if not self.functions:
            return
        function = self.functions[-1]
        checked = any(
            isinstance(call, ast.Call)
            and call.lineno < node.lineno
            and (getattr(call.func, "id", None) or getattr(call.func, "attr", None)) in OPTIONAL_HELPERS
            for call in ast.walk(function)
        )
        self.found.append((node.lineno, function.name, target, checked))


def local_import_problems(
    root: Path, package: str, kept: dict[tuple[str, str, str], str] | None = None
) -> list[str]:
    """Every function-local import that should be at module level or go through an optional helper,
    and every `kept` entry that no longer occurs, as `file:line: ...`."""
    kept = kept or {}
    problems: list[str] = []
    seen: set[tuple[str, str, str]] = set()
    for path in sorted(root.rglob("*.py")):
        where = str(path.relative_to(root.parent))
        visitor = _LocalImports(module_name(path, root, package), path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(), str(path)))
        for line, function, target, checked in visitor.found:
            key = (where, function, target)
            seen.add(key)
            if key in kept:
                continue
            if target.partition(".")[0] not in OPTIONAL:
                problems.append(f"{where}:{line}: {function} imports {target}; import it at module level")
            elif not checked:
                problems.append(
                    f"{where}:{line}: {function} imports {target} before any {'/'.join(OPTIONAL_HELPERS)} "
                    "call of misp_dpo.optional (a missing extra must give its pip install line)"
                )
    stale = [key for key in kept if key not in seen]
    return problems + [f"{w}: {f} no longer imports {t}; drop it from the kept list" for w, f, t in stale]


def test_imports_are_at_module_level_but_the_optional_extras() -> None:
    assert local_import_problems(PACKAGE_ROOT, "misp_dpo", LOCAL_IMPORTS_KEPT) == []


def _plant(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in (root / "pkg").rglob("*"):
        if folder.is_dir() and not (folder / "__init__.py").exists():
            (folder / "__init__.py").write_text("")
    (root / "pkg" / "__init__.py").touch()
    return root / "pkg"


def test_the_checker_reports_a_planted_wrong_way_import(tmp_path: Path) -> None:
    pkg = _plant(
        tmp_path,
        {
            "mining/scores.py": "import numpy\n",
            "pipelines/stage.py": "from pkg.mining import scores\n",
            "pipelines/stages/mine.py": "from pkg.pipelines.stage import X\n",
            "pipelines/runtime/runner.py": "def run():\n    from pkg.pipelines.stages import mine\n",
            "mining/select.py": "def f():\n    from ..pipelines.runtime import runner\n",
            "sae/data.py": "from tests.helpers import write_embeddings\n",
        },
    )
    found = violations(pkg, "pkg")
    assert found == [
        "pkg/mining/select:2: pkg.mining.select imports pkg.pipelines.runtime.runner (core -> runtime)",
        "pkg/pipelines/runtime/runner:2: pkg.pipelines.runtime.runner imports pkg.pipelines.stages.mine "
        "(runtime -> stages)",
        "pkg/sae/data:1: pkg.sae.data imports tests.helpers (test code)",
    ]


def test_the_checker_reports_a_planted_circle(tmp_path: Path) -> None:
    pkg = _plant(
        tmp_path,
        {
            "pipelines/runtime/runner.py": "from pkg.pipelines.runtime import executors\n",
            "pipelines/runtime/executors.py": "def go():\n    from pkg.pipelines.runtime.runner import run\n",
        },
    )
    assert cycles(pkg, "pkg") == [
        ["pkg.pipelines.runtime.executors", "pkg.pipelines.runtime.runner", "pkg.pipelines.runtime.executors"]
    ]
    assert violations(pkg, "pkg") == []


def test_the_checker_reports_planted_local_imports(tmp_path: Path) -> None:
    pkg = _plant(
        tmp_path,
        {
            "optional.py": "def require(extra, purpose):\n    pass\n",
            "mining/scores.py": "def f():\n    import numpy as np\n",
            "mining/select.py": "def outer():\n    def inner():\n        from ..mining import scores\n",
            "dpo/model.py": (
                "from pkg.optional import require\n"
                "def load():\n    require('train', 'x')\n    from transformers import AutoConfig\n"
                "def build():\n    from transformers import LlavaConfig\n    require('train', 'x')\n"
            ),
            "eval/models.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import peft\n",
            "eval/plots.py": "def plot():\n    import matplotlib\n",
        },
    )
    kept = {
        ("pkg/eval/plots.py", "plot", "matplotlib"): "a reason",
        ("pkg/eval/plots.py", "gone", "matplotlib"): "an entry whose import moved",
    }
    assert local_import_problems(pkg, "pkg", kept) == [
        "pkg/dpo/model.py:6: build imports transformers before any require/import_extra/import_faiss "
        "call of misp_dpo.optional (a missing extra must give its pip install line)",
        "pkg/mining/scores.py:2: f imports numpy; import it at module level",
        "pkg/mining/select.py:3: inner imports pkg.mining; import it at module level",
        "pkg/eval/plots.py: gone no longer imports matplotlib; drop it from the kept list",
    ]
