# Copyright 2026 The focal-hf authors. Licensed under the Apache License, Version 2.0.
"""Writing output folders so that a process killed at any instant loses nothing.

A folder is written under a hidden staging name beside its target (`.NAME.new-XXXXXXXX`) and renamed into place
only once complete. An existing target is replaced by renaming it aside (`.NAME.old`), renaming the new folder in,
then deleting the old one: a kill at any instant leaves the old or the new folder whole, and `recover` (run by the
next writer) puts things right. A lock file (`.NAME.lock`) keeps a second writer of the same target out.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock, Timeout


class FolderError(Exception):
    """An output folder that cannot be written; the message says why and what to do."""


def umask() -> int:
    """The process's file-creation mask."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def set_default_modes(path: str | os.PathLike) -> None:
    """Give `path` (a file, or a folder and everything in it) the modes a plain `open`/`mkdir` gives: 0o666 / 0o777
    less the umask. Writers that go through a private temporary file (safetensors, `tempfile.mkdtemp`) leave 0o600
    / 0o700, which other users of a shared machine cannot read."""
    mask = umask()
    path = Path(path)
    if path.is_file():
        path.chmod(0o666 & ~mask)
        return
    path.chmod(0o777 & ~mask)
    for root, folders, files in os.walk(path):
        for name in folders:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def aside_path(target: Path) -> Path:
    """Where `install` moves an existing `target` while it renames the new folder in."""
    return target.with_name(f".{target.name}.old")


def staging_pattern(target: Path) -> str:
    """A glob of the staging folders of `target` (also matching the `.NAME.new` of earlier versions)."""
    return str(target.parent / f".{glob.escape(target.name)}.new*")


class FolderLock:
    """An exclusive, non-blocking lock on writing `target` (a `filelock` lock file beside it, removed on release).
    The operating system drops the lock of a killed process; the file it leaves is reused and removed later."""

    def __init__(self, target: Path, writer: str = "process"):
        self.target = Path(target)
        self.path = self.target.with_name(f".{self.target.name}.lock")
        self._lock = FileLock(self.path, timeout=0, is_singleton=False)
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        except Timeout:
            raise FolderError(
                f"Another {writer} is writing {self.target} (it holds the lock {self.path}); wait for it to finish "
                f"or choose another output folder."
            ) from None
        except OSError as error:
            raise not_writable(self.target, error) from error

    def release(self) -> None:
        # removed while still held: a process that opened the old file finds it unlinked and retries (filelock)
        self.path.unlink(missing_ok=True)
        self._lock.release()

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def not_writable(target: Path, error: OSError) -> FolderError:
    """The error for an output folder that cannot be created or written."""
    return FolderError(
        f"Cannot write {target}: {error.strerror or error} ({error.filename or target.parent}). Choose a folder you "
        f"can write to, or fix its permissions."
    )


def check_writable(target: Path) -> None:
    """Raise a `FolderError` unless the folder `target` is to be written in (or its nearest existing ancestor, which
    it will be created in) can be written: a check before long work."""
    existing = Path(os.path.abspath(target)).parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise FolderError(f"Cannot write {target}: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FolderError(
            f"Cannot write {target}: no permission to write in {existing}. Choose a folder you can write to, or fix "
            f"its permissions."
        )


def recover(target: Path) -> list[str]:
    """Put right what a writer of `target` killed earlier left (call it holding the `FolderLock`): the old folder
    moved aside is restored when the new one never arrived, or removed when it did, and unfinished staging folders
    are removed. Returns one message per action."""
    messages = []
    aside = aside_path(target)
    if aside.exists():
        if target.exists():
            shutil.rmtree(aside)
            messages.append(f"Removed {aside}: the previous {target.name}, left by an interrupted replacement.")
        else:
            os.rename(aside, target)
            messages.append(f"Restored {target} from {aside}, where an interrupted replacement had moved it.")
    for leftover in sorted(glob.glob(staging_pattern(target))):
        shutil.rmtree(leftover)
        messages.append(f"Removed {leftover}: an unfinished folder left by an interrupted run.")
    return messages


def new_staging(target: Path) -> Path:
    """A new, empty staging folder for `target`, beside it."""
    try:
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    except OSError as error:
        raise not_writable(target, error) from error


def install(staging: Path, target: Path) -> None:
    """Move the complete folder `staging` to `target`, replacing an existing `target` by rename-aside and
    rename-in (call it holding the `FolderLock`). File modes become the default ones (`set_default_modes`)."""
    set_default_modes(staging)
    if not target.exists():
        os.rename(staging, target)
        return
    aside = aside_path(target)
    os.rename(target, aside)
    os.rename(staging, target)
    shutil.rmtree(aside)


__all__ = ["FolderError", "FolderLock", "install", "new_staging", "recover", "set_default_modes"]
