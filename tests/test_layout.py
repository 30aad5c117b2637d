"""The package layout shows the data flow, and a test keeps it that way (docs/architecture.md):

core <- toyworld; core <- pretrain; core (+ pretrain.methods, the method registry) <- transfer, wsol;
everything <- pipeline; no library imports tools/. Checked on the import statements (AST) of every module."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "toyworld", "pretrain", "transfer", "wsol", "pipeline")
# package -> (project packages it may import, extra modules it may import from a package not listed)
RULES = {
    "core": ((), ()),
    "toyworld": (("core",), ()),
    "pretrain": (("core",), ()),
    "transfer": (("core",), ("pretrain.methods",)),
    "wsol": (("core",), ("pretrain.methods",)),
    "pipeline": (("core", "toyworld", "pretrain", "transfer", "wsol"), ()),
}
MAX_FUNCTION_LINES = 60


def project_imports(path: Path):
    """(line, imported module) for every import of a project package in `path`, lazy imports included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES + ("tools",):
                yield node.lineno, name


def violations(package: str) -> list[str]:
    allowed, extra = RULES[package]
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, name in project_imports(path):
            top = name.split(".")[0]
            if top == package or top in allowed or any(name == e or name.startswith(e + ".") for e in extra):
                continue
            if isinstance(name, str) and any(e.startswith(name + ".") for e in extra):
                continue  # `from pretrain import methods`
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return bad


@pytest.mark.parametrize("package", PACKAGES)
def test_import_rules(package):
    bad = violations(package)
    assert not bad, "\n".join(bad)


def test_the_rule_checker_catches_a_violation(tmp_path, monkeypatch):
    fake = tmp_path / "core"
    fake.mkdir()
    (fake / "bad.py").write_text("def f():\n    from pretrain.task import run\n    import wsol.metrics\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert violations("core") == ["core/bad.py:2 imports pretrain.task", "core/bad.py:2 imports pretrain.task.run",
                                  "core/bad.py:3 imports wsol.metrics"]


def long_functions(max_lines: int = MAX_FUNCTION_LINES) -> list[str]:
    """Functions longer than `max_lines`, numba kernels (decorated with njit / jit) excepted."""
    out = []
    for package in PACKAGES + ("tools",):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                decorators = ast.unparse(node.decorator_list) if node.decorator_list else ""
                if "jit" in decorators:
                    continue
                n = node.end_lineno - node.lineno + 1
                if n > max_lines:
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_functions_are_short_enough_to_read_at_once():
    assert not long_functions(), "\n".join(long_functions())
