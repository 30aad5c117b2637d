import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MT_NO_PROGRESS", "1")


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """The tiny toy world, generated once per test session (toyworld)."""
    from mixup_transfer.toyworld import make_toy_world
    from wsol.data import cub_to_wsol_metadata

    out = tmp_path_factory.mktemp("toy")
    make_toy_world(out, preset="tiny", seed=0, wsol_metadata=cub_to_wsol_metadata)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (restored after): on a machine with few cores several
    threads per process oversubscribe the cores and run 10-20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def small_toy_world(tmp_path_factory):
    """The small-image track of the tiny toy world (CIFAR-10, CIFAR-100, TinyImageNet-200), once
    per session."""
    from mixup_transfer.toyworld import make_toy_world

    out = tmp_path_factory.mktemp("toy_small")
    make_toy_world(out, preset="tiny", seed=0, track="small")
    return out


_TOOLS: dict = {}


def load_tool(name: str):
    """tools/<name>.py as a module, loaded once per session (the tools are scripts, not a
    package)."""
    if name not in _TOOLS:
        path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"{name}_cli", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _TOOLS[name] = mod
    return _TOOLS[name]


@pytest.fixture()
def run(capsys):
    """run(tool, *args) -> (exit code, stderr) of `tools/<tool>.py`'s main; argparse usage errors
    come back as their SystemExit code."""
    def _run(tool, *args):
        capsys.readouterr()
        try:
            code = load_tool(tool).main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
        return code, capsys.readouterr().err
    return _run
