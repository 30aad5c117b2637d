"""The toolkit as a user installs it: the wheel, in a fresh virtual environment, imported from a
project that has packages of its own named `core` and `pipeline`. The toolkit's own packages live
under `mixup_transfer`, so neither shadows the other, and a pretraining step runs from the
installed files (not from this checkout)."""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mixup_transfer", "pretrain", "transfer", "wsol")

USER_SCRIPT = """
import math, sys
import core, pipeline                      # the user's own packages
assert core.OWNER == "user" and pipeline.OWNER == "user"
import torch, torchvision
import mixup_transfer, pretrain
from mixup_transfer.core.engine import Engine
from mixup_transfer.pipeline.run import run_pipeline
from pretrain.methods import build_method
site = sys.argv[1]
assert mixup_transfer.__file__.startswith(site) and \
pretrain.__file__.startswith(site), mixup_transfer.__file__
torch.manual_seed(0)
method = build_method("multimix", torchvision.models.resnet18(num_classes=10), num_classes=10)
method.generator = torch.Generator().manual_seed(0)
opt = torch.optim.SGD(method.parameters(), lr=0.01)
loss = method(torch.rand(4, 3, 32, 32), torch.arange(4))["loss"]
opt.zero_grad()
loss.backward()
opt.step()
assert math.isfinite(loss.item())
print("step", round(loss.item(), 4))
"""


def _build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", *PACKAGES):
        path = ROOT / name
        copy = shutil.copytree if path.is_dir() else shutil.copy2
        copy(path, src / name,
             **({"ignore": shutil.ignore_patterns("__pycache__")} if path.is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"), str(src)],
                    check=True, capture_output=True)
    (wheel,) = (tmp / "dist").glob("mixup_transfer-*.whl")
    return wheel


@pytest.mark.slow
def test_the_wheel_beside_a_project_with_its_own_core_and_pipeline(tmp_path):
    pytest.importorskip("setuptools")
    wheel = _build_wheel(tmp_path)
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; "
                                         "print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--target", site, str(wheel)], check=True, capture_output=True)
    # torch and the other dependencies come from this environment (a path entry: its .pth files,
    # among them the development install of this checkout, are not processed)
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    names = {p.name for p in Path(site).iterdir()}
    assert set(PACKAGES) <= names and not {"core", "pipeline", "toyworld"} & names
    project = tmp_path / "project"
    for own in ("core", "pipeline"):
        (project / own).mkdir(parents=True)
        (project / own / "__init__.py").write_text('OWNER = "user"\n')
    out = subprocess.run([python, "-c", USER_SCRIPT, site], cwd=project, capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("step ")
