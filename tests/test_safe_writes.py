"""Nothing is lost when the converter is killed, interrupted, raced or pointed at a folder it cannot write."""

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES
from filelock import FileLock
from safetensors.torch import load_file

from focal_hf import convert, folders

CASE = "v1_shift_mean_64"  # the smallest reference fixture
FILES = ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
SRC = str(Path(convert.__file__).resolve().parents[1])


def args(output, *extra):
    return [
        "--config",
        str(FIXTURES / f"{CASE}.yaml"),
        "--checkpoint",
        str(FIXTURES / f"{CASE}.pth"),
        "--output-dir",
        str(output),
        *extra,
    ]


@pytest.fixture
def old_folder(tmp_path):
    """A converted folder with a file of the user's in it: what a `--force` run replaces."""
    output = tmp_path / "out"
    assert convert.main(args(output)) == 0
    (output / "mine.txt").write_text("the old folder")
    return output


def is_old(folder: Path) -> bool:
    return (folder / "mine.txt").read_text() == "the old folder" and sorted(p.name for p in folder.iterdir()) == [
        *FILES[:2],
        "mine.txt",
        *FILES[2:],
    ]


def is_new(folder: Path) -> bool:
    return sorted(p.name for p in folder.iterdir()) == FILES and len(load_file(folder / "model.safetensors")) > 0


class Killed(BaseException):
    """Stands for a SIGKILL: nothing in the process runs afterwards (cleanup is disabled alongside)."""


def test_kill_between_the_two_renames_keeps_the_old_folder_and_the_next_run_recovers(old_folder, monkeypatch, capsys):
    renames = []
    real_rename = os.rename

    def rename(source, destination):
        if Path(source).parent != old_folder.parent:
            return real_rename(source, destination)
        renames.append((Path(source).name, Path(destination).name))
        if len(renames) == 2:  # the rename-in of the new folder: killed just before it
            raise Killed
        real_rename(source, destination)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing up
    monkeypatch.setattr(convert, "recover", lambda target: [])
    with pytest.raises(Killed):
        convert.main(args(old_folder, "--force"))
    assert renames[0] == ("out", ".out.old") and renames[1][0].startswith(".out.new-")
    parent = old_folder.parent
    assert not old_folder.exists() and is_old(parent / ".out.old")  # the old folder is whole, aside
    (staging,) = parent.glob(".out.new-*")
    assert is_new(staging)  # and so is the new one
    monkeypatch.undo()

    # a later run without --force puts the old folder back, and then refuses to replace it
    assert convert.main(args(old_folder)) == 1
    assert "--force" in capsys.readouterr().err
    assert is_old(old_folder) and sorted(p.name for p in parent.iterdir()) == ["out"]
    # with --force it replaces it
    assert convert.main(args(old_folder, "--force")) == 0
    assert is_new(old_folder) and sorted(p.name for p in parent.iterdir()) == ["out"]


def test_kill_while_deleting_the_old_folder_keeps_the_new_one(old_folder, monkeypatch, caplog):
    real_rmtree = shutil.rmtree

    def rmtree(path, *a, **k):
        if Path(path).name == ".out.old":
            (Path(path) / "config.json").unlink()  # killed half-way through deleting it
            raise Killed
        real_rmtree(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    monkeypatch.setattr(convert, "recover", lambda target: [])
    with pytest.raises(Killed):
        convert.main(args(old_folder, "--force"))
    monkeypatch.undo()
    assert is_new(old_folder) and (old_folder.parent / ".out.old").exists()
    assert convert.main(args(old_folder, "--force")) == 0  # the leftover is recognised, reported and removed
    assert "Removed" in caplog.text and ".out.old" in caplog.text
    assert is_new(old_folder) and sorted(p.name for p in old_folder.parent.iterdir()) == ["out"]


KILLER = """
import os, signal, sys
sys.path.insert(0, {src!r})
from focal_hf import convert, folders
moment = {moment!r}
if moment == "between renames":
    real_rename = os.rename
    def rename(source, destination):
        real_rename(source, destination)
        if str(destination).endswith(".old"):
            os.kill(os.getpid(), signal.SIGKILL)
    os.rename = rename
else:  # while writing: the weights are written, the rest not
    def verify(model, staging):
        os.kill(os.getpid(), signal.SIGKILL)
    convert.verify = verify
convert.main({argv!r})
"""


@pytest.mark.parametrize("moment", ["between renames", "while writing"])
def test_real_sigkill_then_recovery(old_folder, moment, caplog):
    script = KILLER.format(src=SRC, moment=moment, argv=args(old_folder, "--force"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    parent = old_folder.parent
    leftovers = sorted(p.name for p in parent.iterdir())
    if moment == "between renames":
        assert not old_folder.exists() and is_old(parent / ".out.old")
    else:
        assert is_old(old_folder)
    assert any(name.startswith(".out.new-") for name in leftovers)  # the unfinished staging folder
    assert convert.main(args(old_folder, "--force")) == 0
    assert "Removed" in caplog.text and ".out.new-" in caplog.text
    assert is_new(old_folder) and sorted(p.name for p in parent.iterdir()) == ["out"]


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, "SIGTERM"])
def test_interrupted_conversion_leaves_nothing(old_folder, monkeypatch, capsys, interruption):
    def verify(model, staging):
        if interruption == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)  # the handler turns it into an interruption
            raise AssertionError("SIGTERM did not interrupt the conversion")
        raise interruption

    monkeypatch.setattr(convert, "verify", verify)
    previous = signal.getsignal(signal.SIGTERM)
    assert convert.main(args(old_folder, "--force")) == 130
    assert "interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == previous
    assert is_old(old_folder) and sorted(p.name for p in old_folder.parent.iterdir()) == ["out"]


def test_failure_while_writing_leaves_nothing(old_folder, monkeypatch):
    def save_pretrained(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert.FocalForImageClassification, "save_pretrained", save_pretrained)
    with pytest.raises(OSError, match="No space"):
        convert.main(args(old_folder, "--force"))
    assert is_old(old_folder) and sorted(p.name for p in old_folder.parent.iterdir()) == ["out"]


def test_a_second_converter_on_the_same_folder_gets_one_clear_message(tmp_path, capsys):
    output = tmp_path / "out"
    with FileLock(tmp_path / ".out.lock", timeout=0):  # held as a running converter holds it
        assert convert.main(args(output)) == 1
    error = capsys.readouterr().err
    assert "Another focal-convert is writing" in error and str(output) in error
    assert error.count("\n") == 1 and "Traceback" not in error
    assert not output.exists()
    assert convert.main(args(output)) == 0  # once it is done, the folder can be written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the lock file is removed


def test_files_are_world_readable_as_the_umask_allows(tmp_path):
    previous = os.umask(0o022)
    try:
        assert convert.main(args(tmp_path / "out")) == 0
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
        assert modes == dict.fromkeys(FILES, 0o644)
        assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
        os.umask(0o077)
        assert convert.main(args(tmp_path / "private")) == 0
        assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "private").iterdir()} == {0o600}
    finally:
        os.umask(previous)


def test_unwritable_output_folder_is_one_clear_message(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert convert.main(args(tmp_path / "file" / "out")) == 1
    error = capsys.readouterr().err
    assert "Cannot write" in error and "is a file, not a folder" in error
    if sys.platform == "linux":  # refused even to root
        assert convert.main(args("/sys/focal-hf-test-out")) == 1
        error = capsys.readouterr().err
        assert (
            error.startswith("focal-convert: error: Cannot write /sys/focal-hf-test-out") and "Traceback" not in error
        )


def test_folder_modes_helper_respects_the_umask(tmp_path):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for path in (folder / "a", folder / "sub" / "b"):
        path.write_text("x")
        path.chmod(0o600)
    (folder / "sub").chmod(0o700)
    previous = os.umask(0o027)
    try:
        folders.set_default_modes(folder)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((folder / "a").stat().st_mode) == 0o640
    assert stat.S_IMODE((folder / "sub" / "b").stat().st_mode) == 0o640
    assert stat.S_IMODE((folder / "sub").stat().st_mode) == 0o750


def test_leftover_of_an_earlier_version_is_cleaned(old_folder, caplog):
    # earlier versions staged `--force` runs in `.NAME.new`, which a kill left behind for good
    shutil.copytree(old_folder, old_folder.parent / ".out.new")
    assert convert.main(args(old_folder, "--force")) == 0
    assert ".out.new" in caplog.text
    assert sorted(p.name for p in old_folder.parent.iterdir()) == ["out"]
