import os

import pytest

os.environ.setdefault("MT_NO_PROGRESS", "1")


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """The tiny toy world, generated once per test session (pretrain.toy)."""
    from pretrain.toy import make_toy_world

    out = tmp_path_factory.mktemp("toy")
    make_toy_world(out, preset="tiny", seed=0)
    return out
