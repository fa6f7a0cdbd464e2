"""A run directory is untrusted input: one crafted by someone else must never make minigpt write, read, hash,
size or delete a file outside it. And real failures of the disk (a real small file system, not a monkeypatch)
end in one line with the path and the fix, the last good checkpoint intact."""

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli, set_args, tiny_overrides

from minigpt.run import files as checkpoint


@pytest.fixture
def victim(tmp_path):
    """A file and a folder of checkpoints outside the run that nothing may touch."""
    outside = tmp_path / "outside"
    (outside / "step_0000001").mkdir(parents=True)
    (outside / "step_0000001" / "model.safetensors").write_bytes(b"precious" * 1000)
    secret = outside / "secret.txt"
    secret.write_text("the owner's file\n" * 100)
    return outside


def fingerprint(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def copy_run(good_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    return run


def edit_pointer(run: Path, **changes) -> None:
    pointer = json.loads((run / "latest.json").read_text())
    pointer.update(changes)
    (run / "latest.json").write_text(json.dumps(pointer))


def one_line(r, *words):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, \
        r.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def digest_spy(monkeypatch):
    """Every path minigpt hashes (file_digest reads the whole file)."""
    seen = []
    real = checkpoint.file_digest
    monkeypatch.setattr(checkpoint, "file_digest", lambda p: seen.append(Path(p).resolve()) or real(p))
    return seen


def test_a_symlinked_lock_is_refused_and_its_target_untouched(good_run, tmp_path, victim):
    run = copy_run(good_run, tmp_path)
    before = fingerprint(victim)
    (run / ".lock").unlink(missing_ok=True)
    (run / ".lock").symlink_to(victim / "secret.txt")
    r = run_cli("train", "--resume", str(run), "--set", "train.max_steps=3")
    one_line(r, ".lock is a symbolic link")
    assert fingerprint(victim) == before


@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_latest_json_cannot_point_outside_the_run(good_run, tmp_path, victim, digest_spy, where):
    run = copy_run(good_run, tmp_path)
    target = str(victim / "step_0000001") if where == "absolute" else "../outside/step_0000001"
    edit_pointer(run, dir=target, files={})
    for argv in (["generate", "--run", str(run), "--prompt", "x"], ["convert", "--to-hf", str(run), "--out",
                                                                    str(tmp_path / "hf")],
                 ["train", "--resume", str(run), "--set", "train.max_steps=3"]):
        line = one_line(run_cli(*argv), "latest.json is corrupt")
        assert str(victim) not in line and "8,000" not in line  # no outside path or size is ever named
    assert not any(str(p).startswith(str(victim.resolve())) for p in digest_spy)
    assert not (tmp_path / "hf").exists()


def test_listed_files_cannot_climb_out_of_the_checkpoint(good_run, tmp_path, victim, digest_spy):
    run = copy_run(good_run, tmp_path)
    pointer = json.loads((run / "latest.json").read_text())
    pointer["files"]["../../../outside/secret.txt"] = {"bytes": 1, "sha256": "0" * 64}
    (run / "latest.json").write_text(json.dumps(pointer))
    line = one_line(run_cli("generate", "--run", str(run), "--prompt", "x"), "outside its checkpoint folder")
    assert "secret" not in line
    assert not any("outside" in str(p) for p in digest_spy)


@pytest.mark.parametrize("step", [-5, "3", 10**15, True])
def test_a_step_that_is_not_a_count_is_refused(good_run, tmp_path, step):
    run = copy_run(good_run, tmp_path)
    edit_pointer(run, step=step)
    one_line(run_cli("generate", "--run", str(run), "--prompt", "x"), "is not a step count")


def test_a_symlinked_checkpoint_is_never_followed_nor_pruned_through(good_run, tmp_path, victim):
    """A `checkpoints` folder, or a step folder in it, that links elsewhere: resuming refuses before any
    pruning, and the folders it points to survive."""
    before = fingerprint(victim)
    run = copy_run(good_run, tmp_path)
    (run / "checkpoints" / "step_0000001").symlink_to(victim / "step_0000001", target_is_directory=True)
    one_line(run_cli("train", "--resume", str(run), "--set", "train.max_steps=4", "--set", "train.checkpoint_every=1"),
             "is a symbolic link")
    run2 = copy_run(good_run, tmp_path / "b")
    shutil.rmtree(run2 / "checkpoints")
    (run2 / "checkpoints").symlink_to(victim, target_is_directory=True)
    one_line(run_cli("train", "--resume", str(run2), "--set", "train.max_steps=4"), "is a symbolic link")
    assert fingerprint(victim) == before


def test_pruning_deletes_only_what_the_run_wrote(good_run, tmp_path, corpus_dir, data_cache):
    """A folder in checkpoints/ that looks like a step but holds a user's own file is kept."""
    run = copy_run(good_run, tmp_path)
    mine = run / "checkpoints" / "step_0000000"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    r = run_cli("train", "--resume", str(run), "--set", "train.max_steps=3")
    assert r.returncode == 0, r.stderr
    assert (mine / "notes.txt").read_text() == "mine"
    assert checkpoint.latest_checkpoint(run)[1] == 3 and not (run / "checkpoints" / "step_0000002").exists()


# ---- a real small file system -------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 700 KiB (real ENOSPC from the kernel); skipped where this machine cannot mount one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:80]}): the injected full-disk tests stand in")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_real_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_one(small_disk, corpus_dir, data_cache):
    run = small_disk / "run"
    args = set_args(tiny_overrides(corpus_dir, data_cache, run, **{"train.max_steps": 6, "train.checkpoint_every": 2,
                                                                      "train.keep_checkpoints": 3}))
    r = run_cli("train", *args)
    line = one_line(r, "cannot write", str(run / "checkpoints"), "free disk space", "--resume")
    assert "the last complete checkpoint (step" in line
    folder, step = checkpoint.latest_checkpoint(run)  # verified: the committed one is whole
    assert step >= 2 and (folder / "model.safetensors").is_file()
    assert not list((run / "checkpoints").glob(".step_*"))  # the partial one is gone


def test_a_real_full_disk_for_the_token_cache_names_the_cache(small_disk, corpus_dir, tmp_path):
    big = tmp_path / "corpus"
    big.mkdir()
    for i, f in enumerate(sorted(corpus_dir.iterdir())):
        for copy in range(8):  # ~1.6 MB of text: its tokens do not fit 700 KiB
            shutil.copy(f, big / f"{copy}_{i}_{f.name}")
    r = run_cli("prepare", "--set", f"data.source={big}", "--set", f"data.cache_dir={small_disk / 'cache'}",
                "--set", "model.vocab_size=512")
    one_line(r, "cannot write", str(small_disk / "cache"), "the token cache")
    assert not [p for p in (small_disk / "cache").rglob("*") if p.is_file()]  # nothing half-written left


def test_a_read_only_run_directory_is_one_line(good_run, tmp_path):
    if os.geteuid() == 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,ro", "tmpfs", str(ro)], capture_output=True)
        if r.returncode != 0:
            pytest.skip("cannot mount a read-only tmpfs here")
        try:
            r = run_cli("train", "--set", f"train.out_dir={ro / 'run'}", "--set", "train.max_steps=1")
            one_line(r, str(ro / "run"), "read-only")
        finally:
            subprocess.run(["umount", "-l", str(ro)], capture_output=True)
    else:
        pytest.skip("root mounts the read-only file system this test needs")
