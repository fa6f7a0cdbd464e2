"""The wheel carries the presets: installed (not editable) and run from an empty directory, the
commands that name a preset work without the source tree."""

import json
import os
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO, set_args, tiny_overrides


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The wheel built from this checkout, unpacked as an installed package would be."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(REPO)], check=True, capture_output=True)
    wheel = next(out.glob("minigpt-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "minigpt/configs/tiny.toml" in names and "minigpt/configs/gpt3-175b.toml" in names
    site = out / "site"
    zipfile.ZipFile(wheel).extractall(site)
    return site


def run_installed(site, cwd, *args):
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "minigpt", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_an_installed_wheel_runs_from_an_empty_directory(site, tmp_path, corpus_dir, data_cache):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = "import minigpt, sys; print(minigpt.__file__)"
    where = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=empty,
                           env={**os.environ, "PYTHONPATH": str(site)}).stdout
    assert where.startswith(str(site))  # the installed copy, not the source tree
    r = run_installed(site, empty, "extrapolate", "--target", "gpt3-175b", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["params_total"] > 1.7e11
    sets = tiny_overrides(corpus_dir, data_cache, tmp_path / "run", **{"train.max_steps": 1, "train.eval_every": 0})
    r = run_installed(site, empty, "train", "--config", "tiny", *set_args(sets))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 1
