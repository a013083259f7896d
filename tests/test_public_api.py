"""The public surface: each package's ``__all__``, and which private modules cross package lines.

The packages are ``sensplan`` (the shared core: errors, artifacts, effects, tables, registry),
``sensplan.sensitivity``, ``sensplan.planner``, ``sensplan.reports`` and ``sensplan.cli``. A
package's private modules (``_name``) are its own business: another package imports its public
names. The core's private modules (``sensplan._errors``, ``sensplan._effects`` ...) are the
vocabulary every stage shares and are not covered by the rule.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> the package it is installed as (see pyproject.toml)
SOURCES = {"sensplan": "sensplan", "sensitivity": "sensplan.sensitivity",
           "planner": "sensplan.planner", "reports": "sensplan.reports"}
SUBPACKAGES = ("sensitivity", "planner", "reports", "cli")
PACKAGES = ["sensplan", "sensplan.sensitivity", "sensplan.sensitivity.methods",
            "sensplan.sensitivity.tasks", "sensplan.planner", "sensplan.planner.export", "sensplan.reports",
            "sensplan.cli"]

#: (importing module, another package's private module) edges that the design needs
NECESSARY = {
    # CLI-only helpers of the planner: check_compatible, VARIANTS, check_objective, the demo
    ("sensplan.cli.apply", "sensplan.planner._apply"),
    ("sensplan.cli.apply", "sensplan.planner._plan"),
    ("sensplan.cli.plan", "sensplan.planner._plan"),
    ("sensplan.cli.demo", "sensplan.planner._demo"),
}
#: edges that exist today although the names are public (or point the wrong way); each should
#: become a public import, then leave this list
PENDING: set[tuple[str, str]] = set()


def _isort_key(name: str) -> tuple[int, str]:
    """Constants, then classes, then functions and the rest; each alphabetical."""
    return (0 if name.isupper() else 1 if name[:1].isupper() else 2, name)


@pytest.mark.parametrize("module", PACKAGES)
def test_every_exported_name_exists_and_imports(module):
    mod = importlib.import_module(module)
    assert mod.__all__, module
    for name in mod.__all__:
        assert getattr(mod, name, None) is not None, f"{module}.{name}"
        scope: dict[str, object] = {}
        exec(f"from {module} import {name}", scope)  # noqa: S102 - the names come from __all__
        assert scope[name] is getattr(mod, name)


@pytest.mark.parametrize("module", PACKAGES)
def test_all_is_sorted_and_unique(module):
    names = importlib.import_module(module).__all__
    assert len(set(names)) == len(names), module
    assert names == sorted(names, key=_isort_key), module


def test_the_lazy_executor_names_are_exported():
    import sensplan.planner as planner

    assert set(planner._EXECUTOR) <= set(planner.__all__)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        planner.nope  # noqa: B018


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    parts[0] = SOURCES[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1] in SUBPACKAGES else "sensplan"


def _imported(tree: ast.AST, package: str) -> set[str]:
    """Every module name an import statement names (``from a import b``: ``a`` and ``a.b``);
    relative imports are resolved against ``package``, the importing module's package."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _private_target(name: str) -> str | None:
    """``sensplan.<pkg>._mod`` of a name inside a subpackage's private module, else None."""
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != "sensplan" or parts[1] not in SUBPACKAGES:
        return None
    for i, part in enumerate(parts[2:], 2):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[: i + 1])
    return None


def _edges() -> set[tuple[str, str]]:
    edges = set()
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            module = _module_name(path)
            package = module if path.name == "__init__.py" else module.rpartition(".")[0]
            for name in _imported(ast.parse(path.read_text(), str(path)), package):
                target = _private_target(name)
                if target and _package(target) != _package(module):
                    edges.add((module, target))
    return edges


def test_the_edge_finder_sees_what_it_should():
    tree = ast.parse("from sensplan.planner._plan import Plan\nimport sensplan.reports._render\n"
                     "from sensplan.sensitivity import scan\nfrom sensplan._errors import X\n"
                     "from ._helpers import y\n")
    found = {_private_target(n) for n in _imported(tree, "sensplan.cli")} - {None}
    assert found == {"sensplan.planner._plan", "sensplan.reports._render", "sensplan.cli._helpers"}
    up = ast.parse("from .._plan import Plan\n")
    assert "sensplan.planner._plan.Plan" in _imported(up, "sensplan.planner.sub")
    assert _package("sensplan.sensitivity.methods.prune") == "sensplan.sensitivity"
    assert _package("sensplan._validate") == "sensplan"
    assert _package("sensplan.cli") == "sensplan.cli"
    assert ("sensplan.cli.plan", "sensplan.planner._plan") in _edges()


def test_no_package_imports_another_packages_private_module():
    unexpected = sorted(_edges() - NECESSARY - PENDING)
    assert not unexpected, (
        "Import these names from the package's public __init__ (add them to its __all__) instead: "
        + "; ".join(f"{a} -> {b}" for a, b in unexpected))


def test_user_errors_share_one_base():
    import sensplan

    for name in ("ModelSpecError", "CheckpointError", "DataSpecError", "BudgetError",
                 "InfeasibleBudgetError", "ArtifactError", "IncompatibleModelError"):
        assert issubclass(getattr(sensplan, name), sensplan.UserInputError)
    assert issubclass(sensplan.UserInputError, sensplan.SensplanError)
    assert not issubclass(sensplan.InternalError, sensplan.UserInputError)
