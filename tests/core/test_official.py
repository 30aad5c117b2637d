"""mixup_transfer.core.official: the commit of an authors' checkout, and a fixture written with its
entry of the index official_fixtures.json."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from mixup_transfer.core.official import INDEX, checkout_commit, write_fixture

SHA = "0123456789abcdef0123456789abcdef01234567"


def test_write_fixture_round_trips_the_arrays_and_adds_the_note_last(tmp_path):
    others = {"zeta.npz": {"commit": "z"}, "alpha.npz": {"cases": [[1, 2.5]]}}
    (tmp_path / INDEX).write_text(json.dumps(others, indent=2) + "\n")
    arrays = {"x": np.arange(6, dtype=np.float32).reshape(2, 3) / 4,
              "labels": np.array([-1, 3], np.int8), "lam": np.array(0.25)}
    note = {"repository": "https://example.org/r", "commit": SHA, "inputs": "x_k [2, 3]"}
    path = write_fixture(tmp_path, "mid.npz", arrays, note)
    assert path == tmp_path / "mid.npz"
    with np.load(path) as z:
        assert z.files == ["x", "labels", "lam"]
        np.testing.assert_array_equal(z["x"], [[0, 0.25, 0.5], [0.75, 1, 1.25]])
        assert z["x"].dtype == np.float32 and z["labels"].dtype == np.int8
        assert z["labels"].tolist() == [-1, 3] and float(z["lam"]) == 0.25
    expected = {"zeta.npz": {"commit": "z"}, "alpha.npz": {"cases": [[1, 2.5]]}, "mid.npz": note}
    text = (tmp_path / INDEX).read_text()
    assert text == json.dumps(expected, indent=2) + "\n"
    assert list(json.loads(text)) == ["zeta.npz", "alpha.npz", "mid.npz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mid.npz", INDEX]  # no .tmp left


def test_write_fixture_replaces_an_entry_in_place_and_starts_an_index(tmp_path):
    out = tmp_path / "fixtures"
    write_fixture(out, "a.npz", {"v": np.array([1])}, {"commit": "one"})
    assert (out / INDEX).read_text() == '{\n  "a.npz": {\n    "commit": "one"\n  }\n}\n'
    write_fixture(out, "b.npz", {"v": np.array([2])}, {"commit": "two"})
    write_fixture(out, "a.npz", {"v": np.array([3, 4])}, {"commit": "three"})
    assert json.loads((out / INDEX).read_text()) == {"a.npz": {"commit": "three"},
                                                    "b.npz": {"commit": "two"}}
    assert list(json.loads((out / INDEX).read_text())) == ["a.npz", "b.npz"]
    with np.load(out / "a.npz") as z:
        assert z["v"].tolist() == [3, 4]


def test_write_fixture_refuses_a_name_that_is_not_npz(tmp_path):
    with pytest.raises(ValueError, match="ends with .npz"):
        write_fixture(tmp_path, "a.json", {"v": np.array([1])}, {})
    assert not list(tmp_path.iterdir())


def test_checkout_commit_reads_a_commit_file(tmp_path):
    (tmp_path / "COMMIT").write_text(f"  {SHA}\nexported with git archive\n")
    assert checkout_commit(tmp_path) == SHA
    assert checkout_commit(str(tmp_path)) == SHA


def test_checkout_commit_without_git_or_commit_file_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        checkout_commit(tmp_path)
    assert info.value.filename == str(tmp_path / "COMMIT")
    (tmp_path / "COMMIT").write_text("\n")
    with pytest.raises(FileNotFoundError):
        checkout_commit(tmp_path)


def _git(root, *args) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@example.org",
           "GIT_COMMITTER_NAME": "a", "GIT_COMMITTER_EMAIL": "a@example.org",
           "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                          check=True, env=env).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_checkout_commit_of_a_git_checkout_and_of_an_export_inside_one(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "mixup.py").write_text("x = 1\n")
    _git(repo, "add", "mixup.py")
    _git(repo, "commit", "-q", "-m", "one")
    head = _git(repo, "rev-parse", "HEAD")
    assert len(head) in (40, 64) and checkout_commit(repo) == head
    # an exported tree inside another work tree: its COMMIT, not the enclosing HEAD
    export = repo / "export"
    export.mkdir()
    (export / "COMMIT").write_text(SHA + "\n")
    assert checkout_commit(export) == SHA
    (export / "COMMIT").unlink()
    with pytest.raises(FileNotFoundError):
        checkout_commit(export)
