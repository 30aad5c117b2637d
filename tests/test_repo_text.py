"""The repository's text says what is, not how it came to be.

Every tracked text file (code, comments, configs, tests, messages, docs) is scanned for
development-history
text: sessions, issue numbers, "previous version", machine-specific timings, and references to
files that do not exist (such as the `papers/...` copies the toolkit was written from: cite a paper
by its title or arXiv id). README.md is checked by a test of its own, so that its failures are told
apart from the code's.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = re.compile(r"(\.(md|py|ya?ml|txt|toml|sh|cfg|ini)|Makefile|/run)$")
SKIP = ("tests/fixtures/", "tests/test_repo_text.py")

HISTORY = {
    "a session": re.compile(r"\bsessions?\b[^=\n]{0,3}[0-9]|\b(this|earlier|previous|last|next) "
                            r"sessions?\b", re.I),
    "an issue number": re.compile(r"\bissues? #?[0-9]+|\bitems? [0-9]+-[0-9]+\b", re.I),
    "an earlier version": re.compile(r"\b(previous|earlier|old) "
                                     r"(version|code|implementation|release)s?\b"
                                     r"|\bonce it lands\b|\bbefore the (package "
                                     r")?move\b|\b(as|from) before\b", re.I),
    "a machine-specific timing": re.compile(r"\bon (\d+|two) (idle |shared )?(CPU "
                                            r")?cores\b|\b\d+-core (CPU|machine)\b"
                                            r"|\bthis machine\b|\bmeasured once\b", re.I),
    "a papers/ path": re.compile(r"\bpapers/\S"),
}
# a repository path in prose: configs/..., mixup_transfer/..., tools/x.py (placeholders such as
# {method}, X or * skipped)
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:configs|docs|mixup_transfer|pretrain|tests|tools|transfer|wsol)"
    r"/[\w./-]*\w\.(?:py|ya?ml|md|json|txt))\b"
)


def _tracked() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [f for f in out.splitlines() if TEXT.search(f) and not f.startswith(SKIP)
            and (ROOT / f).is_file()]


def _dangling(path: str) -> bool:
    """A path into one of the repository's folders (another repository's configs/COCO-Detection/...
    is not) that names no file; placeholders ({method}, *, <run>, X.yaml) are not paths."""
    if re.search(r"[{}*<>]|(^|/)X\.", path) or not (ROOT / path).parent.is_dir():
        return False
    return not (ROOT / path).exists()


def history_lines(name: str, text: str) -> list[str]:
    """'file:line: what' for every development-history phrase and every missing repository path in
    `text`."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for what, rx in HISTORY.items():
            m = rx.search(line)
            if m:
                found.append(f"{name}:{n}: {what} ({m.group(0)!r})")
        # tests name missing files
        for path in [] if name.startswith("tests/") else REPO_PATH.findall(line):
            if _dangling(path):
                found.append(f"{name}:{n}: a file that does not exist ({path})")
    return found


def test_history_patterns_catch_what_they_should():
    # assembled from pieces so that this file does not itself read as history text to other
    # scanners
    s, i, p = "sess" + "ion", "iss" + "ue", "pap" + "ers/"
    bad = [f"in {s} 4's run", f"the previous {s}s' AlignMix", f"({i} 13)", f"{i} 14 items 5-7",
           "remove once it lands", "about 5.5 min on 2 CPU cores", "before the package move",
           f"see {p}000 §4", "the previous version of the loader",
           "a run from before fingerprints", "declared in pretrain/trainer.py DEFAULTS"]
    assert all(history_lines("x", line) for line in bad), [b for b in bad
                                                           if not history_lines("x", b)]
    good = ["scope='session'", "the pytest session", "pretrain/task.py DEFAULTS",
            "configs/pretrain/toy_{method}.yaml", "MultiMix (NeurIPS 2023, arXiv:2311.05538)",
            "the CPU cores, at most 8"]
    assert not [g for g in good if history_lines("x", g)]


def test_no_development_history_in_code_configs_tests_and_docs():
    found = [hit for f in _tracked() if f != "README.md"
             for hit in history_lines(f, (ROOT / f).read_text(encoding="utf-8", errors="replace"))]
    assert not found, "development-history text:\n" + "\n".join(found)


def test_no_development_history_in_readme():
    """README.md alone (its failures are the README's, not the code's)."""
    readme = ROOT / "README.md"
    if not readme.is_file():
        pytest.skip("no README.md")
    found = history_lines("README.md", readme.read_text(encoding="utf-8"))
    assert not found, "README.md: development-history text:\n" + "\n".join(found)
