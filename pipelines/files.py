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

ERASED_FILE = "erased.safetensors"  # the trained tensors, with their metadata header
LORA_FILE = "pytorch_lora_weights.safetensors"  # a LoRA erasure's adapters, diffusers' layout
# What loreun 0.1 named it (a UNet's name, though SD3 and FLUX train a transformer): still read.
LEGACY_ERASED_FILE = "unet-erased.safetensors"
ERASE_CONFIG = "erase_config.json"  # the run's identity, beside its outputs and checkpoints
TRAIN_LOG = "train_log.jsonl"  # one line per optimizer step
SALIENCY_MASK = "saliency-mask.safetensors"
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.jsonl"  # one line per generated image, read by the audit
GENERATE_CONFIG = "generate_config.json"  # the generation run's identity
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Files loreun writes get the permissions any program's would (0644 under the usual umask),
# though they are made through mkstemp: a web UI run by another user must read an export.
UMASK = _umask()


def refuse_link(path: str | Path) -> Path:
    """``path``, unless it is a symlink: loreun never writes, moves or removes through a link it
    did not make (one planted at a name loreun writes would redirect the write to its target).

    Raises:
        FileExistsError: naming the link.
    """
    path = Path(path)
    if path.is_symlink():
        raise FileExistsError(
            f"{path} is a symlink where loreun writes its own file or folder; loreun never "
            "follows a link it did not make. Remove it"
        )
    return path


def temp_file(path: Path) -> tuple[int, Path]:
    """(open descriptor, name) of a new, exclusively created file beside ``path``.

    The name is random and made with O_EXCL, so a link planted under a predictable name (the
    process id) cannot redirect the write; a killed write leaves ``.NAME.tmp-*``, which
    ``remove_ours`` recognises.
    """
    import tempfile

    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    if hasattr(os, "fchmod"):  # mkstemp makes 0600; others (a web UI's user) must read it
        os.fchmod(fd, 0o666 & ~UMASK)
    return fd, Path(name)


def temp_dir(path: Path) -> Path:
    """A new, exclusively created folder beside ``path`` (``.NAME.tmp-*``), as ``temp_file``."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    folder.chmod(0o777 & ~UMASK)  # mkdtemp makes 0700; a shared folder is read by others
    return folder


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a temporary file, synced, renamed over it."""
    path = refuse_link(path)
    fd, tmp = temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_safetensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> None:
    """Write a safetensors file through a temporary name, so a crash never leaves half a file.

    Raises:
        OSError: naming the file, where safetensors' own error (a missing folder, a full disk)
            names none.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = refuse_link(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(2, "no such folder", str(path.parent))
    fd, tmp = temp_file(path)
    os.close(fd)
    try:
        data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(data, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~UMASK)  # safetensors writes 0600: a web UI's user must read it
        os.replace(tmp, path)
    except SafetensorError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"cannot write {path}: {e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: str | Path, where: str) -> dict:
    """A JSON object loreun wrote, or a one-line error naming ``where`` (the flag) and the file,
    for a torn, edited or foreign one."""
    import json

    path = Path(path)
    try:
        data = json.loads(refuse_link(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: {path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: {path}: not a JSON object")
    return data


def open_append(path: str | Path):
    """A log opened for appending (text, UTF-8), never through a symlink."""
    path = refuse_link(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    return os.fdopen(os.open(path, flags, 0o644), "a", encoding="utf-8")


def make_dir(path: str | Path) -> Path:
    """``path`` as a real folder (created with its parents), never a symlink to one."""
    path = refuse_link(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


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

    def __init__(self, folder: str | Path, flag: str = "--out", remove: bool = False):
        """``remove``: delete the lock file on release (a folder that is shared, such as an
        exported pipeline, keeps no trace of it)."""
        self.folder, self.flag, self._fh, self.remove = Path(folder), flag, None, remove

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
        if self._fh is not None and self.remove:
            (self.folder / self.NAME).unlink(missing_ok=True)  # while still held
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

    A user's file inside one of loreun's folders is never deleted with it, and nothing is
    removed through a symlink (a linked folder would delete its target's files).
    """
    folder = refuse_link(folder)
    for name in names:
        refuse_link(folder / name).unlink(missing_ok=True)
        for torn in folder.glob(f".{name}.tmp-*"):  # an atomic write cut short by a kill
            if torn.is_file() and not torn.is_symlink():
                torn.unlink()
    try:
        folder.rmdir()
    except OSError:  # not empty: something loreun did not write is in it
        return False
    return True


def replace_folder(tmp: str | Path, final: str | Path) -> None:
    """Put the freshly written folder ``tmp`` in place of ``final``.

    Where ``final`` exists, each new file is renamed into it in turn and nothing of ``final`` is
    moved or removed but the files replaced: a user's files stay where they are, and a kill
    midway leaves them in place (``recover_folder`` finishes the move on the next run).
    """
    import shutil

    tmp, final = Path(tmp), refuse_link(final)
    if not final.exists():
        os.replace(tmp, final)
        return
    for new in sorted(p for p in tmp.rglob("*") if p.is_file()):
        rel = new.relative_to(tmp).parts
        for depth in range(1, len(rel) + 1):  # no folder on the way, nor the file, is a link
            refuse_link(final.joinpath(*rel[:depth]))
        dest = final.joinpath(*rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(new, dest)
    shutil.rmtree(tmp)  # only empty folders are left in it


def recover_folder(final: str | Path) -> list[Path]:
    """Finish what a killed ``replace_folder`` (or a killed write of ``final``) left beside
    ``final``: files in a ``.NAME.tmp-*`` folder that ``final`` lacks are moved into it (a
    user's file the older way of replacing had moved out, or a new file), the rest removed.

    Returns:
        The leftover folders dealt with, for the caller to report.
    """
    import shutil

    final = Path(final)
    found = sorted(p for p in final.parent.glob(f".{final.name}.tmp-*") if p.is_dir())
    for left in found:
        if left.is_symlink():
            continue
        if final.is_dir():
            for old in sorted(p for p in left.rglob("*") if p.is_file()):
                rel = old.relative_to(left).parts
                for depth in range(1, len(rel) + 1):  # never through a link planted in final
                    refuse_link(final.joinpath(*rel[:depth]))
                dest = final.joinpath(*rel)
                if not dest.exists():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(old, dest)
        shutil.rmtree(left)
    return found


def check_apart(
    output: str | Path, inputs: dict, flag: str = "--out", may_hold: bool = False
) -> None:
    """Refuse an output that is, contains, or lies inside one of the command's inputs, with or
    without --overwrite: writing it would replace or mix into what the command reads (a base
    model's weights, the erase run being exported).

    Args:
        inputs: flag -> path (or a hub id or built-in name, which names no local path).
        may_hold: an input inside the output is fine (an audit's report beside the folders of
            images it scores, as ``loreun evaluate`` lays them out).
    """
    out = Path(output).expanduser().resolve()
    for name, value in inputs.items():
        if not value or not Path(str(value)).expanduser().exists():
            continue
        src = Path(str(value)).expanduser().resolve()
        if out == src or out.is_relative_to(src) or (src.is_relative_to(out) and not may_hold):
            how = "is" if out == src else "lies inside" if out.is_relative_to(src) else "holds"
            raise ValueError(
                f"{flag}: {output} {how} the input {name} {value}; loreun never writes over "
                "what it reads. Choose another place"
            )


def check_writable(folder: str | Path, flag: str = "--out") -> Path:
    """Create ``folder`` and prove a file can be written there, before any work starts.

    Raises:
        PermissionError: with a one-line message naming the flag and the folder.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = temp_file(folder / ".write-test")
        os.close(fd)
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"{flag}: cannot write to {folder}: {e.strerror or e}") from None
    return folder
