"""The package layout shows the data flow, and a test keeps it that way (docs/architecture.md):

core <- toyworld; core <- pretrain; core (+ pretrain.methods, the method registry) <- transfer,
wsol; everything <- pipeline; no library imports tools/; a method family of pretrain/methods/
imports `base` and its own solver, not another family. Checked on the import statements (AST) of
every module."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the project's packages, by import name (the toolkit's own live under one namespace,
# mixup_transfer)
CORE, TOY, PIPE = "mixup_transfer.core", "mixup_transfer.toyworld", "mixup_transfer.pipeline"
PACKAGES = (CORE, TOY, "pretrain", "transfer", "wsol", PIPE)
# package -> (project packages it may import, extra modules it may import from a package not
# listed)
RULES = {
    CORE: ((), ()),
    TOY: ((CORE,), ()),
    "pretrain": ((CORE,), ()),
    "transfer": ((CORE,), ("pretrain.methods",)),
    "wsol": ((CORE,), ("pretrain.methods",)),
    PIPE: ((CORE, TOY, "pretrain", "transfer", "wsol"), ()),
}
MAX_FUNCTION_LINES = 60


def package_of(name: str) -> str | None:
    """The project package an imported module name belongs to (None: not the project's)."""
    if name == "mixup_transfer":
        return "mixup_transfer"
    for package in PACKAGES + ("tools",):
        if name == package or name.startswith(package + "."):
            return package
    return None


def folder(package: str) -> Path:
    return ROOT.joinpath(*package.split("."))


def project_imports(path: Path):
    """(line, imported module) for every import of a project package in `path`, lazy imports
    included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if package_of(name) is not None:
                yield node.lineno, name


def violations(package: str) -> list[str]:
    allowed, extra = RULES[package]
    bad = []
    for path in sorted(folder(package).rglob("*.py")):
        for line, name in project_imports(path):
            top = package_of(name)
            if top in (package, "mixup_transfer") or top in allowed:
                continue
            if any(name == e or name.startswith(e + ".") for e in extra):
                continue
            if any(e.startswith(name + ".") for e in extra):
                continue  # `from pretrain import methods`
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return bad


@pytest.mark.parametrize("package", PACKAGES)
def test_import_rules(package):
    bad = violations(package)
    assert not bad, "\n".join(bad)


# pretrain.methods' family modules may import `base`, their own solver (`<family>_graphcut`) and
# these others
FAMILY_EXTRA = {"multi_interp": {"puzzlemix"},  # multi_interp mixes with PuzzleMix's masks
                # Co-Mixup computes PuzzleMix's saliency and solves its labelings with PuzzleMix's
                # graph cut
                "comixup": {"puzzlemix", "puzzlemix_graphcut"},
                "comixup_graphcut": {"puzzlemix_graphcut"}}


def family_violations(root: Path) -> list[str]:
    """Imports of another family's module from a module of pretrain/methods/ (the registry,
    __init__, excepted)."""
    bad = []
    for path in sorted((root / "pretrain" / "methods").glob("*.py")):
        if path.stem == "__init__":
            continue
        allowed = {"base", path.stem, f"{path.stem}_graphcut"} | FAMILY_EXTRA.get(path.stem, set())
        for line, name in project_imports(path):
            # `from pretrain.methods import base` is judged by pretrain.methods.base
            parts = name.split(".")
            if parts[:2] == ["pretrain", "methods"] and len(parts) > 2 and parts[2] not in allowed:
                bad.append(f"{path.relative_to(root)}:{line} imports {name}")
    return bad


def test_method_families_import_only_base_and_their_own_solver(tmp_path):
    assert not family_violations(ROOT), "\n".join(family_violations(ROOT))
    fake = tmp_path / "pretrain" / "methods"
    fake.mkdir(parents=True)
    (fake / "cutmix.py").write_text("from pretrain.methods import base\n"
                                    "from pretrain.methods.puzzlemix import x\n"
                                    "from pretrain.methods import ERM\n")
    (fake / "puzzlemix.py").write_text("from pretrain.methods.puzzlemix_graphcut import "
                                       "grid_labels\n")
    assert family_violations(tmp_path) == ["pretrain/methods/cutmix.py:2 imports "
                                           "pretrain.methods.puzzlemix",
                                           "pretrain/methods/cutmix.py:2 imports "
                                           "pretrain.methods.puzzlemix.x",
                                           "pretrain/methods/cutmix.py:3 imports "
                                           "pretrain.methods.ERM"]


def test_the_rule_checker_catches_a_violation(tmp_path, monkeypatch):
    fake = tmp_path / "mixup_transfer" / "core"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n"
                                 "    from pretrain.task import run\n"
                                 "    import wsol.metrics\n"
                                 "    from mixup_transfer.pipeline import run\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    bad = "mixup_transfer/core/bad.py"
    assert violations(CORE) == [f"{bad}:2 imports pretrain.task",
                                f"{bad}:2 imports pretrain.task.run",
                                f"{bad}:3 imports wsol.metrics", f"{bad}:4 imports {PIPE}",
                                f"{bad}:4 imports {PIPE}.run"]


def test_no_tool_edits_the_import_path():
    """The tools import the installed packages; none prepends the repository to sys.path."""
    for path in sorted((ROOT / "tools").glob("*.py")):
        text = path.read_text()
        assert "sys.path.insert(0, str(Path(__file__)" not in text, path.name


def test_no_tool_shadows_a_package():
    """A script's folder comes first on sys.path: tools/<package>.py would hide the package from
    its imports."""
    packages = {p.split(".")[0] for p in PACKAGES} | {"torch", "torchvision", "yaml", "numpy"}
    assert not [p.name for p in (ROOT / "tools").glob("*.py") if p.stem in packages]


def long_functions(max_lines: int = MAX_FUNCTION_LINES) -> list[str]:
    """Functions longer than `max_lines`, numba kernels (decorated with njit / jit) excepted."""
    out = []
    for package in PACKAGES + ("tools",):
        for path in sorted(folder(package).rglob("*.py")):
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


# the detection stage above its backends, the shared configuration and scoring below them
# (docs/architecture.md)
DETECTION = "transfer.detection"
DETECTION_BACKENDS = (f"{DETECTION}.torchvision_backend", f"{DETECTION}.d2_backend")
DETECTION_STAGE = f"{DETECTION}.stage"
# the stage's command line (tools/run_detection.py's flags and command)
DETECTION_CLI = f"{DETECTION}.cli"
# module -> the detection backends it may import: the stage dispatches to both; the eval-only
# evaluation predicts with the torchvision backend's model, datasets and sharded prediction; the
# command line starts detectron2's own launch (--num-gpus)
BACKEND_IMPORTERS = {DETECTION_STAGE: DETECTION_BACKENDS,
                     f"{DETECTION}.evaluate": (DETECTION_BACKENDS[0],),
                     DETECTION_CLI: (DETECTION_BACKENDS[1],)}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _imports_module(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def detection_violations() -> list[str]:
    """A backend imported by a module of transfer/detection/ other than the stage (and the
    eval-only evaluation, the torchvision backend's); the stage imported by anything but the
    pipeline, the tools and the stage's command line."""
    bad = []
    for package in PACKAGES + ("tools",):
        for path in sorted(folder(package).rglob("*.py")):
            name = module_name(path)
            for line, imported in project_imports(path):
                for backend in DETECTION_BACKENDS:
                    if (name.startswith(DETECTION + ".") and _imports_module(imported, backend)
                            and backend not in BACKEND_IMPORTERS.get(name, ())):
                        bad.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
                if (_imports_module(imported, DETECTION_STAGE) and package not in (PIPE, "tools")
                        and name != DETECTION_CLI):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    return bad


def test_detection_stage_above_its_backends():
    bad = detection_violations()
    assert not bad, "\n".join(bad)


def test_the_detection_checker_catches_a_violation(tmp_path, monkeypatch):
    det = tmp_path / "transfer" / "detection"
    det.mkdir(parents=True)
    (det / "scoring.py").write_text("from transfer.detection import d2_backend\n")
    (det / "d2_backend.py").write_text("def f():\n    from transfer.detection.stage import run\n")
    (det / "stage.py").write_text("from transfer.detection import d2_backend, "
                                  "torchvision_backend\n")
    (tmp_path / "wsol").mkdir()
    (tmp_path / "wsol" / "x.py").write_text("import transfer.detection.stage\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert detection_violations() == [
        "transfer/detection/d2_backend.py:2 imports transfer.detection.stage",
        "transfer/detection/d2_backend.py:2 imports transfer.detection.stage.run",
        "transfer/detection/scoring.py:1 imports transfer.detection.d2_backend",
        "wsol/x.py:1 imports transfer.detection.stage"]


def test_tests_mirror_the_packages():
    """Each folder of tests/ is named after the package it tests; the files directly in tests/
    check the whole project (docs/testing.md)."""
    mirrored = {"core", "toyworld", "pipeline", "pretrain", "transfer", "wsol"}
    folders = {p.name for p in (ROOT / "tests").iterdir() if p.is_dir()
               and p.name not in ("fixtures", "__pycache__")}
    assert folders == mirrored, sorted(folders ^ mirrored)
    for name in mirrored:
        package = name if name in ("pretrain", "transfer", "wsol") else f"mixup_transfer.{name}"
        assert folder(package).is_dir(), package
        assert list((ROOT / "tests" / name).glob("test_*.py")), name
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert len(names) == len(set(names)), (
        "two test files share a name (pytest imports them by base name)"
    )
