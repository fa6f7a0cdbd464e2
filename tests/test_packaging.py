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


def test_every_torchrun_line_of_the_readme_and_docs_is_one_the_suite_runs():
    """The torchrun commands users paste are the ones tests/test_distributed, test_sharding and test_pipeline
    run (as written, made small): docs/scale-out.md's; the README and the other pages only repeat them."""
    from conftest import doc_torchrun_lines, readme_torchrun_lines

    tested = set(readme_torchrun_lines()) | set(readme_torchrun_lines(sharded=True)) | set(readme_torchrun_lines(pipeline=True))
    shown = set(doc_torchrun_lines())
    assert shown <= tested, shown - tested


def test_the_docs_site_builds_in_strict_mode(tmp_path):
    """mkdocs build --strict: a broken link or a page left out of the nav fails the suite."""
    import subprocess
    import sys

    import pytest
    from conftest import REPO

    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "serve" / "index.html").is_file()


def test_the_readme_is_short_and_links_only_to_pages_that_exist():
    import re

    from conftest import REPO

    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    for target in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (REPO / target).is_file(), target


def test_plot_compares_runs_with_different_tokenizers_in_bits_per_byte(good_run, tmp_path):
    """Nats per token do not compare across tokenizers; bits per byte do: `minigpt plot` switches and says so."""
    import shutil

    from conftest import run_cli

    other = tmp_path / "other"
    shutil.copytree(good_run, other)
    data = json.loads((other / "data.json").read_text())
    data["tokenizer_sha256"] = "0" * 64  # another tokenizer, as far as the plot is concerned
    (other / "data.json").write_text(json.dumps(data))
    same = run_cli("plot", str(good_run), str(good_run), "--out", str(tmp_path / "same.png"))
    assert same.returncode == 0 and "in nats per token" in same.stdout
    r = run_cli("plot", str(good_run), str(other), "--out", str(tmp_path / "two.png"))
    assert r.returncode == 0 and "bits per byte" in r.stdout and (tmp_path / "two.png").stat().st_size > 10_000
