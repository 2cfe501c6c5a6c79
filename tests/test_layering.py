"""The layering of docs/STYLE (shared/STYLE.md), checked on the source: dependencies point down.

Floors: ``fedrnd.data``, ``fedrnd.models`` (0) < ``fedrnd.engine`` (1) < ``fedrnd.rnd``,
``fedrnd.graphs``, ``fedrnd.ntk`` (2) < ``fedrnd.algorithms`` (3) < ``fedrnd.driver`` (4) <
``fedrnd.cli`` (5). Every import in every module under ``fedrnd/`` (at any depth: inside
functions and ``TYPE_CHECKING`` blocks too, since a deferred import is still a dependency) must
go to the same floor or a lower one, and no method module (``fedrnd.algorithms.<method>``)
may import another: what methods share lives in ``fedrnd.algorithms.base``, the private
``fedrnd.algorithms._*`` helpers, or lower floors. The top-level ``fedrnd/__init__.py`` (a lazy
facade) and ``fedrnd/__main__.py`` are exempt; names imported from the facade count at the
floor of the module they resolve to (``from fedrnd import simulate`` is a driver import).
Failures print ``file:line``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import fedrnd

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fedrnd"

FLOORS = {"fedrnd.data": 0, "fedrnd.models": 0, "fedrnd.configs": 0,
          "fedrnd.compilation_cache": 0, "fedrnd.engine": 1,
          "fedrnd.rnd": 2, "fedrnd.graphs": 2, "fedrnd.ntk": 2, "fedrnd.algorithms": 3,
          "fedrnd.driver": 4, "fedrnd.cli": 5}
"""``fedrnd.configs`` holds the packaged default config (data only) and
``fedrnd.compilation_cache`` the persistent-cache setup (JAX only): the floor of the data."""
EXEMPT = {"fedrnd", "fedrnd.__main__"}
SHARED_ALGORITHM_MODULES = {"fedrnd.algorithms", "fedrnd.algorithms.base"}
"""Modules of the algorithms package that are not methods (besides ``_*`` helpers)."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def floor(module: str) -> int | None:
    """The floor of a fedrnd module (``None``: not under a floor, e.g. a third-party one)."""
    best = None
    for prefix, f in FLOORS.items():
        if module == prefix or module.startswith(prefix + "."):
            best = f
    return best


def is_method_module(module: str) -> bool:
    parts = module.split(".")
    return (len(parts) == 3 and parts[:2] == ["fedrnd", "algorithms"]
            and module not in SHARED_ALGORITHM_MODULES and not parts[2].startswith("_"))


def _targets(node: ast.AST, here: str, package: bool) -> list[str]:
    """The fedrnd modules an import statement depends on (a submodule where the imported name
    is one, else the module itself; facade names resolved through ``fedrnd._LAZY``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level:  # relative: from the current package
        base = here.split(".") if package else here.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    out = []
    for a in node.names:
        sub = f"{mod}.{a.name}"
        if mod == "fedrnd" and a.name in fedrnd._LAZY:
            out.append(fedrnd._LAZY[a.name])
        elif (ROOT / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                (ROOT / Path(*sub.split(".")) / "__init__.py").is_file():
            out.append(sub)
        else:
            out.append(mod)
    return out


def violations() -> list[str]:
    found = []
    for path in sorted(PKG.rglob("*.py")):
        here = _module_name(path)
        if here in EXEMPT:
            continue
        mine = floor(here)
        assert mine is not None, f"{path.relative_to(ROOT)}: {here} is on no floor (FLOORS)"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in _targets(node, here, _is_package(path)):
                if not (target == "fedrnd" or target.startswith("fedrnd.")):
                    continue
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                theirs = floor(target)
                if theirs is not None and theirs > mine:
                    found.append(f"{where}: {here} (floor {mine}) imports {target} "
                                 f"(floor {theirs})")
                if is_method_module(here) and target.startswith("fedrnd.algorithms") and (
                        is_method_module(target) or target == "fedrnd.algorithms"):
                    found.append(f"{where}: method module {here} imports {target}; move what "
                                 "they share into fedrnd.algorithms.base, a fedrnd.algorithms._* "
                                 "helper or the engine")
    return found


def test_imports_point_down_and_methods_do_not_import_each_other():
    bad = violations()
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_the_checker_sees_violations(tmp_path, monkeypatch):
    """The check itself: an upward import inside a function, a method importing a method
    through the package, and a relative one are all reported with their line."""
    fake = tmp_path / "fedrnd"
    (fake / "engine").mkdir(parents=True)
    (fake / "algorithms").mkdir()
    for p in (fake / "__init__.py", fake / "engine" / "__init__.py",
              fake / "algorithms" / "__init__.py", fake / "algorithms" / "base.py",
              fake / "algorithms" / "ifca.py"):
        p.write_text("")
    (fake / "engine" / "bad.py").write_text("def f():\n    from fedrnd.driver import outputs\n")
    (fake / "algorithms" / "mine.py").write_text(
        "from fedrnd.algorithms import base\nfrom . import ifca\nfrom fedrnd.engine import bad\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PKG", fake)
    bad = violations()
    assert "fedrnd/engine/bad.py:2: fedrnd.engine.bad (floor 1) imports fedrnd.driver " \
        "(floor 4)" in bad, bad
    assert any(b.startswith("fedrnd/algorithms/mine.py:2: method module") and "ifca" in b
               for b in bad), bad
    assert not any("mine.py:1" in b or "mine.py:3" in b for b in bad), bad
