"""One config pattern (STYLE 4): each core owns its config dataclass; a stage config nests it.

A core config is a dataclass under a core (embed, sae, mining, dpo, eval) whose fields are declared
with `option(...)` or whose name ends in Config, Settings or Params. A dataclass under pipelines/
that declares a field of a core config its module
imports redeclares it (the default then lives twice): the test walks the AST and fails on that. It
is shown to fail on a planted redeclaration.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "misp_dpo"
CORES = ("embed", "sae", "mining", "dpo", "eval")


def _dataclasses(tree: ast.Module) -> dict[str, ast.ClassDef]:
    def is_dataclass(node: ast.expr) -> bool:
        target = node.func if isinstance(node, ast.Call) else node
        return (isinstance(target, ast.Name) and target.id == "dataclass") or (
            isinstance(target, ast.Attribute) and target.attr == "dataclass"
        )

    return {
        node.name: node
        for node in tree.body
        if isinstance(node, ast.ClassDef) and any(is_dataclass(d) for d in node.decorator_list)
    }


def _fields(cls: ast.ClassDef, documented_only: bool = False) -> set[str]:
    found = set()
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            value = node.value
            is_option = (
                isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "option"
            )
            if is_option or not documented_only:
                found.add(node.target.id)
    return found


def core_configs(root: Path, cores: tuple[str, ...] = CORES) -> dict[str, set[str]]:
    """Class name -> fields, for every config dataclass under a core (see the module docstring)."""
    configs: dict[str, set[str]] = {}
    for core in cores:
        for path in sorted((root / core).rglob("*.py")):
            for name, cls in _dataclasses(ast.parse(path.read_text())).items():
                if _fields(cls, documented_only=True) or name.endswith(("Config", "Settings", "Params")):
                    configs[name] = _fields(cls)
    return configs


def redeclarations(root: Path, cores: tuple[str, ...] = CORES) -> list[str]:
    """`file: Class.field redeclares Core.field` for every pipelines dataclass field a core config owns."""
    configs = core_configs(root, cores)
    problems = []
    for path in sorted((root / "pipelines").rglob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            for alias in node.names
        }
        for name, cls in _dataclasses(tree).items():
            for core in sorted(imported & set(configs)):
                for field in sorted(_fields(cls) & configs[core]):
                    where = path.relative_to(root.parent)
                    problems.append(f"{where}: {name}.{field} redeclares {core}.{field}; nest {core} instead")
    return problems


# the same name for another thing: the flag takes auto|cpu|cuda, TrainSettings the resolved device
DIFFERENT = {"SaeConfig.device redeclares TrainSettings.device"}


def test_no_stage_config_redeclares_a_core_config_field() -> None:
    known = DIFFERENT
    assert [p for p in redeclarations(PACKAGE_ROOT) if p.split(": ")[1].split(";")[0] not in known] == []


def test_the_checker_reports_a_planted_redeclaration(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "mining").mkdir(parents=True)
    (root / "pipelines" / "stages").mkdir(parents=True)
    (root / "mining" / "strategies.py").write_text(
        "from dataclasses import dataclass\n"
        "@dataclass(frozen=True)\n"
        "class SelectionParams:\n"
        "    negatives: int = option(3, 'N')\n"
        "    tau: float = option(1.0, 'temperature')\n"
    )
    (root / "pipelines" / "stages" / "mine.py").write_text(
        "from dataclasses import dataclass\n"
        "from pkg.mining.strategies import SelectionParams\n"
        "@dataclass(frozen=True, kw_only=True)\n"
        "class MineConfig:\n"
        "    selection: SelectionParams = option(SelectionParams(), 'nested: fine')\n"
        "    batch_size: int = option(256, 'not a core field: fine')\n"
        "    tau: float = option(1.0, 'declared twice')\n"
    )
    assert redeclarations(root, ("mining",)) == [
        "pkg/pipelines/stages/mine.py: MineConfig.tau redeclares SelectionParams.tau; "
        "nest SelectionParams instead"
    ]
