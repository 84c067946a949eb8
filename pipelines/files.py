"""loreun's files on disk: their names, written once here, and how they are written.

Writes are atomic (a file appears whole under its final name, or not at all), output folders
are locked while a run writes into them, and nothing a user put in one of loreun's folders is
removed with it. torch-free, so every package (and the CLI) can use it.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: FolderLock uses filelock instead
    fcntl = None

ERASED_FILE = "unet-erased.safetensors"  # the trained tensors, with their metadata header
ERASE_CONFIG = "erase_config.json"  # the run's identity, beside its outputs and checkpoints
TRAIN_LOG = "train_log.jsonl"  # one line per optimizer step
SALIENCY_MASK = "saliency-mask.safetensors"
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.jsonl"  # one line per generated image, read by the audit
GENERATE_CONFIG = "generate_config.json"  # the generation run's identity
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_safetensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> None:
    """Write a safetensors file through a temporary name, so a crash never leaves half a file."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _tmp_name(path)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata
    )
    os.replace(tmp, path)


class FolderLock:
    """An OS lock on ``folder/.loreun.lock``, held while a run writes into the folder.

    OS locks die with the process, so a killed run never leaves a stale lock; a second run into
    the same folder is refused at once instead of interleaving with the first. POSIX systems
    lock with ``flock`` and record the holder's pid in the file; where there is no ``fcntl``
    (Windows) the lock is ``filelock``'s, which comes with torch and huggingface_hub. The lock
    file is never opened through a symlink: a link planted there would make the pid overwrite
    its target.
    """

    NAME = ".loreun.lock"

    def __init__(self, folder: str | Path, flag: str = "--out"):
        self.folder, self.flag, self._fh = Path(folder), flag, None

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / self.NAME
        if path.is_symlink():
            raise FileExistsError(
                f"{self.flag}: {path} is a symlink; loreun writes its lock there and never "
                "follows a link it did not make. Remove it"
            )
        if fcntl is None:
            return self._acquire_filelock(path)
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        fh = os.fdopen(os.open(path, flags, 0o644), "r+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = fh.read().strip() or "another process"
            fh.close()
            raise self._busy(holder) from None
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._fh = fh
        return self

    def _acquire_filelock(self, path: Path) -> FolderLock:
        from filelock import FileLock, Timeout

        lock = FileLock(str(path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise self._busy("another process") from None
        self._fh = lock
        return self

    def _busy(self, holder: str) -> FileExistsError:
        return FileExistsError(
            f"{self.flag}: {self.folder} is in use by another loreun run ({holder}); "
            "wait for it or choose another folder"
        )

    def release(self) -> None:
        if self._fh is not None:
            # closing drops the flock; filelock's lock is released the same way
            (self._fh.release if hasattr(self._fh, "release") else self._fh.close)()
            self._fh = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_ours(folder: str | Path, names: tuple[str, ...]) -> bool:
    """Delete the files ``names`` that loreun wrote in ``folder``; the folder goes only if that
    leaves it empty. Returns True when the folder is gone.

    A user's file inside one of loreun's folders is never deleted with it.
    """
    folder = Path(folder)
    for name in names:
        (folder / name).unlink(missing_ok=True)
        for torn in folder.glob(f".{name}.tmp-*"):  # an atomic write cut short by a kill
            torn.unlink()
    try:
        folder.rmdir()
    except OSError:  # not empty: something loreun did not write is in it
        return False
    return True


def replace_folder(tmp: str | Path, final: str | Path) -> None:
    """Put the freshly written folder ``tmp`` in place of ``final``, keeping every file of
    ``final`` that ``tmp`` does not also have (a user's notes in an exported folder)."""
    import shutil

    tmp, final = Path(tmp), Path(final)
    if final.is_dir():
        for old in sorted(final.rglob("*")):
            new = tmp / old.relative_to(final)
            if old.is_file() and not new.exists():
                new.parent.mkdir(parents=True, exist_ok=True)
                os.replace(old, new)
        shutil.rmtree(final)  # only files that the new folder replaces are left in it
    os.replace(tmp, final)


def check_writable(folder: str | Path, flag: str = "--out") -> Path:
    """Create ``folder`` and prove a file can be written there, before any work starts.

    Raises:
        PermissionError: with a one-line message naming the flag and the folder.
    """
    folder = Path(folder)
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"{flag}: cannot write to {folder}: {e.strerror}") from None
    return folder
