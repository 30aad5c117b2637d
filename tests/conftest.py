import os

import pytest
import torch

os.environ.setdefault("MT_NO_PROGRESS", "1")


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """The tiny toy world, generated once per test session (toyworld)."""
    from toyworld import make_toy_world
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
    """The small-image track of the tiny toy world (CIFAR-10, CIFAR-100, TinyImageNet-200), once per session."""
    from toyworld import make_toy_world

    out = tmp_path_factory.mktemp("toy_small")
    make_toy_world(out, preset="tiny", seed=0, track="small")
    return out
