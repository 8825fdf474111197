"""Crash-safe saving: single files replaced atomically, whole bundle directories swapped in atomically.

What is guaranteed if the saving process is killed (SIGKILL, OOM killer) at any instant, or the machine loses power
(every new file and directory is fsynced before it is made visible, and the directory holding it after):

* :func:`atomic_write_text`, :func:`atomic_save_safetensors`: the destination is the old complete file or the new
  complete file. The new file is written to a temporary file beside it and renamed over it (``os.replace``, atomic
  within one file system on POSIX and Windows).
* :func:`atomic_directory` (``with atomic_directory(target) as staging: <write the bundle into staging>``): the
  bundle switches as a whole. The new bundle is built in a staging directory *beside* the target (same file
  system); files of the old target that the new save does not write (the user's own files, ``base_model/``, other
  adapters' folders, an edited README) are brought in as hard links (copies where links are impossible), unless
  ``keep_other_files=False``; then the two directories are swapped:

  - **Linux, file systems with ``renameat2(RENAME_EXCHANGE)``** (ext4, xfs, btrfs, tmpfs, f2fs, ...): one system
    call exchanges the staging directory and the target. At every instant the target path names a complete bundle,
    the old or the new one, for readers too; nothing needs recovering after a crash.
  - **elsewhere** (other systems, or a file system refusing ``RENAME_EXCHANGE``): two renames, ``target -> aside``
    then ``staging -> target``. A crash between them leaves no target and the complete old bundle aside; the next
    save into the same folder, or :func:`recover_interrupted_save`, renames it back. So after a crash the target is
    the old or the new bundle once that recovery has run; a reader in the microseconds between the two renames finds
    no directory.
  - **a target that cannot be swapped** (a mount point, or a parent directory this process may not write to): files
    are moved into the target one by one, each atomically, and a warning is logged. A crash can then leave files of
    two saves side by side; save into a subfolder of the mount point to get the whole-bundle guarantee.

  Readers that open the bundle's files one by one may still see two different bundles if a save completes between
  their two ``open`` calls; open the directory once (``os.open(target, os.O_RDONLY)``) and the files relative to it
  (``dir_fd=``) to read one bundle.

Temporary entries carry the owner's host, pid and process start time in their names
(``.<name>.palora-<kind>-<digest>-<host>-<pid>-<start>-<random>``). Each save removes those of dead processes of
this host in the folders it writes to (and restores an aside left by an interrupted two-rename swap); entries of
live processes, and of other hosts sharing the file system, are never touched. On Windows a dead process cannot be
told from a live one safely, so stale entries are left for the user to delete.

New files and directories get the permissions a plain ``open()`` / ``os.mkdir`` would give them (``0o666`` /
``0o777`` less the umask); a swapped-in bundle directory keeps the permissions of the directory it replaces.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "AtomicDirectory",
    "atomic_directory",
    "atomic_save_safetensors",
    "atomic_write_text",
    "carry_into_staging",
    "recover_interrupted_save",
]

logger = logging.getLogger(__name__)

_STEM_CHARS = 80  # keeps every temporary name well under NAME_MAX (255 bytes)
_DEBRIS = re.compile(
    r"^\..*\.palora-(?P<kind>staging|old|tmp)-(?P<digest>[0-9a-f]{8})-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-"
    r"(?P<start>\d+)-[0-9a-f]{8}(?:\.[A-Za-z0-9]+)?$",
    re.DOTALL,
)
# Left by the per-file protocol of earlier versions (``tempfile`` names); never part of a bundle.
_LEGACY_DEBRIS = re.compile(r"^\.tmp-(?:save-[A-Za-z0-9_]{8}|[A-Za-z0-9_]{8}\.(?:txt|safetensors))$")

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, getattr(errno, "EOPNOTSUPP", -1), getattr(errno, "ENOTSUP", -1)}
_renameat2_function = None
_renameat2_looked_up = False

# Staging directories of saves in progress in this process: a save into one of them (a bundle saving a sub-bundle
# into its own staging directory) writes there directly, the enclosing save makes the whole atomic.
_ACTIVE_STAGING: set[str] = set()
_ACTIVE_LOCK = threading.Lock()


# ----------------------------------------------------------------------------------------------------------------------
# Owners of temporary entries
# ----------------------------------------------------------------------------------------------------------------------
def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


_HOST = _digest(socket.gethostname())


def _process_stat(pid: int) -> tuple[str, int] | None:
    """``(state, start time in clock ticks since boot)`` of a process from ``/proc``, or None where there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # the command name, in parentheses, may hold spaces
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


_own_start: dict[int, int] = {}


def _owner() -> str:
    pid = os.getpid()  # looked up on each call: a forked child is another owner
    if pid not in _own_start:
        found = _process_stat(pid)
        _own_start[pid] = found[1] if found else 0
    return f"{_HOST}-{pid}-{_own_start[pid]}"


def _owner_is_alive(host: str, pid: int, start: int) -> bool:
    """False only when the owner is certainly gone: same host, and no such process, a zombie, or a reused pid."""
    if host != _HOST or os.name != "posix":
        return True  # another machine's pids mean nothing here; on Windows os.kill would terminate the process
    if pid == os.getpid():
        own_start = int(_owner().rsplit("-", 1)[1])
        return start == own_start or 0 in (start, own_start)  # else an earlier process that had our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: it exists, under another user
    found = _process_stat(pid)
    if found is None:
        return True
    state, started = found
    if state in ("Z", "X"):
        return False
    return not (start and started != start)


def _parse_debris(name: str):
    match = _DEBRIS.match(name)
    if match is None:
        return None
    return match["kind"], match["digest"], _owner_is_alive(match["host"], int(match["pid"]), int(match["start"]))


def _is_temporary(name: str) -> bool:
    return _DEBRIS.match(name) is not None or _LEGACY_DEBRIS.match(name) is not None


def _new_name(directory: str, stem: str, kind: str, suffix: str = "") -> str:
    return os.path.join(
        directory, f".{stem[:_STEM_CHARS]}.palora-{kind}-{_digest(stem)}-{_owner()}-{secrets.token_hex(4)}{suffix}"
    )


# ----------------------------------------------------------------------------------------------------------------------
# File-system primitives
# ----------------------------------------------------------------------------------------------------------------------
def _fsync_path(path: str, directory: bool = False) -> None:
    try:
        fd = os.open(path, (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if directory else os.O_RDONLY)
    except OSError:
        if directory:
            return  # Windows cannot open directories; their entries are durable once the rename returns
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    _fsync_path(path)


def _fsync_tree(root: str, files: bool = True) -> None:
    """fsync every regular file (if ``files``) and every directory under ``root``, children before parents."""
    for directory, _, names in os.walk(root, topdown=False):
        if files:
            for name in names:
                path = os.path.join(directory, name)
                if stat.S_ISREG(os.lstat(path).st_mode):
                    _fsync_path(path)
        _fsync_path(directory, directory=True)


def _make_directory(parent: str, stem: str, kind: str) -> str:
    while True:
        path = _new_name(parent, stem, kind)
        try:
            os.mkdir(path, 0o777)  # the umask applies, as for any os.mkdir
            return path
        except FileExistsError:
            continue


def _make_file(directory: str, stem: str, suffix: str) -> str:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        path = _new_name(directory, stem, "tmp", suffix)
        try:
            os.close(os.open(path, flags, 0o666))  # the umask applies, as for a plain open()
            return path
        except FileExistsError:
            continue


def _remove_tree(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            if os.path.lexists(path):  # a read-only folder in it (a bundle the user made read-only): make it writable
                for root, _, _ in os.walk(path):
                    os.chmod(root, stat.S_IMODE(os.lstat(root).st_mode) | stat.S_IRWXU)
                shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
    except FileNotFoundError:
        pass
    except OSError:
        logger.debug("could not remove %s", path, exc_info=True)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _renameat2():
    global _renameat2_function, _renameat2_looked_up
    if not _renameat2_looked_up:
        _renameat2_looked_up = True
        if sys.platform.startswith("linux"):
            try:
                function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.2
            except (AttributeError, OSError):
                function = None
            if function is not None:
                function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                function.restype = ctypes.c_int
            _renameat2_function = function
    return _renameat2_function


def _rename_exchange(first: str, second: str) -> bool:
    """Swap two existing paths in one atomic step; False where the system or the file system cannot."""
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), first, None, second)


@contextmanager
def _locked(directory: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``directory`` (every save into one folder takes it to swap); a no-op where absent."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # some network file systems
            pass
        yield
    finally:
        os.close(fd)


def _clean_temporaries(directory: str, stem: str | None = None, target: str | None = None) -> None:
    """Remove the temporary entries of dead owners in ``directory``; put back an interrupted swap's aside.

    ``stem``: only entries made for that name. ``target``: a bundle directory in ``directory`` whose aside (kind
    ``old``) is renamed back to ``target`` if ``target`` is missing. An aside whose target exists is the old bundle of
    a finished swap and is removed; one whose target is missing and not ``target`` is left for its own recovery.
    """
    try:
        names = os.listdir(directory)
    except OSError:
        return
    wanted = None if stem is None else _digest(stem)
    target_digest = None if target is None else _digest(os.path.basename(target))
    present = None
    for name in names:
        parsed = _parse_debris(name)
        if parsed is None:
            continue
        kind, digest, alive = parsed
        if alive or (wanted is not None and digest != wanted):
            continue
        path = os.path.join(directory, name)
        if kind == "old":
            if digest == target_digest and not os.path.lexists(target):
                try:
                    os.rename(path, target)
                    logger.warning("restored %s from %s, left by an interrupted save", target, path)
                    continue
                except OSError:
                    logger.warning("could not restore %s from %s", target, path, exc_info=True)
                    continue
            if present is None:
                present = {_digest(other) for other in names if not _is_temporary(other)}
                present |= {target_digest} if target is not None and os.path.lexists(target) else set()
            if digest not in present:
                continue  # its bundle is missing: this is the only complete copy left
        _remove_tree(path)


def recover_interrupted_save(target) -> bool:
    """Put back a bundle directory that a save killed between its two renames left aside; True if one was.

    Only needed where ``RENAME_EXCHANGE`` is unavailable (see the module docstring); the next save into the same
    folder does the same. A loader may call it before reading ``target``.
    """
    path = os.path.realpath(os.fspath(target))  # a link to the bundle dangles while the bundle is aside
    if os.path.lexists(path):
        return False
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        return False
    with _locked(parent):
        _clean_temporaries(parent, stem=os.path.basename(path), target=path)
    return os.path.isdir(path)


def _replace_in(directory: str, source: str, destination: str) -> None:
    """``os.replace`` that also crosses file systems (a copy beside the destination, then a rename)."""
    try:
        os.replace(source, destination)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        tmp_path = _make_file(directory, os.path.basename(destination), ".move")
        try:
            shutil.copy2(source, tmp_path)
            _fsync_path(tmp_path)
            os.replace(tmp_path, destination)
        except BaseException:
            _remove_quietly(tmp_path)
            raise


# ----------------------------------------------------------------------------------------------------------------------
# Single files
# ----------------------------------------------------------------------------------------------------------------------
def _temp_path_beside(path: str, suffix: str) -> str:
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    return _make_file(directory, os.path.basename(path), suffix)


def _finish_file(tmp_path: str, path: str) -> None:
    _fsync_path(tmp_path)
    os.replace(tmp_path, path)
    directory = os.path.dirname(os.path.abspath(path))
    _fsync_path(directory, directory=True)
    _clean_temporaries(directory, stem=os.path.basename(path))


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8); the file gets the permissions ``open(path, "w")`` would."""
    tmp_path = _temp_path_beside(path, ".txt")
    try:
        with open(tmp_path, "w", encoding="utf-8") as handle:
            handle.write(text)
        _finish_file(tmp_path, path)
    except BaseException:
        _remove_quietly(tmp_path)
        raise


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` to ``path`` atomically, with the permissions a plain ``open()`` would give."""
    from safetensors.torch import save_file  # imported here: saving bundles of plain files needs no torch

    tmp_path = _temp_path_beside(path, ".safetensors")
    try:
        mode = stat.S_IMODE(os.stat(tmp_path).st_mode)  # what the kernel gave a new file under the umask
        save_file(tensors, tmp_path, metadata=metadata)
        os.chmod(tmp_path, mode)  # safetensors writes its files -rw------- whatever the umask
        _finish_file(tmp_path, path)
    except BaseException:
        _remove_quietly(tmp_path)
        raise


# ----------------------------------------------------------------------------------------------------------------------
# Whole directories
# ----------------------------------------------------------------------------------------------------------------------
def _resolve_target(target) -> str:
    if isinstance(target, bytes):
        target = os.fsdecode(target)
    if not isinstance(target, (str, os.PathLike)):
        raise TypeError(f"save directory must be a path (str or os.PathLike), got {type(target).__name__}.")
    path = os.fspath(target)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise ValueError("save directory must not be empty; give a directory such as './my-bundle'.")
    if os.path.islink(path) and not os.path.exists(path) and not recover_interrupted_save(path):
        raise ValueError(f"save directory {path!r} is a symbolic link to {os.readlink(path)!r}, which does not exist.")
    real = os.path.realpath(path)  # a link to a directory: the bundle is saved where it points, the link stays
    if os.path.exists(real) and not os.path.isdir(real):
        raise ValueError(f"save directory {path!r} is a file, not a directory; give a directory.")
    if os.path.dirname(real) == real:
        raise ValueError(f"save directory {path!r} is the root of the file system; give a folder for the bundle.")
    return real


def _inside_active_staging(path: str) -> bool:
    with _ACTIVE_LOCK:
        active = tuple(_ACTIVE_STAGING)
    return any(path == staging or path.startswith(staging + os.sep) for staging in active)


def _set_active(staging: str, active: bool) -> None:
    with _ACTIVE_LOCK:
        if active:
            _ACTIVE_STAGING.add(staging)
        else:
            _ACTIVE_STAGING.discard(staging)


def _carry_over(old_root: str, new_root: str) -> None:
    """Bring every entry of ``old_root`` that ``new_root`` lacks into it: hard links (copies where impossible) for
    files, the same target for symbolic links, new directories filled recursively. Temporary entries are left out."""
    pending = [(old_root, new_root)]
    created: list[tuple[str, int]] = []
    while pending:
        old_dir, new_dir = pending.pop()
        with os.scandir(old_dir) as entries:
            entries = list(entries)
        for entry in entries:
            if _is_temporary(entry.name):
                continue
            destination = os.path.join(new_dir, entry.name)
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                if not os.path.lexists(destination):
                    os.mkdir(destination, 0o700)  # writable while it is filled; given the old mode below
                    created.append((destination, stat.S_IMODE(info.st_mode)))
                elif not (os.path.isdir(destination) and not os.path.islink(destination)):
                    continue  # the new save wrote a file where the old bundle had a folder: the new one wins
                pending.append((entry.path, destination))
            elif os.path.lexists(destination):
                continue  # written by the new save
            elif stat.S_ISLNK(info.st_mode):
                os.symlink(os.readlink(entry.path), destination)
            elif stat.S_ISREG(info.st_mode):
                try:
                    os.link(entry.path, destination)
                except OSError:
                    shutil.copy2(entry.path, destination)
            elif stat.S_ISFIFO(info.st_mode):
                os.mkfifo(destination, stat.S_IMODE(info.st_mode))
            # sockets and device nodes are not bundle content: left out
    for path, mode in reversed(created):
        os.chmod(path, mode)


def _restore_working_directory(cwd: str | None, target: str) -> None:
    """A process whose working directory was inside the old bundle follows the swap (else it sits in a removed one)."""
    if cwd is None or not (cwd == target or cwd.startswith(target + os.sep)):
        return
    for path in (cwd, target):
        try:
            os.chdir(path)
            return
        except OSError:
            continue


class AtomicDirectory:
    """A staging directory for a new version of ``target``, swapped in as a whole by :meth:`commit`.

    :func:`atomic_directory` is the usual way to use it. The class form is for savers in several processes:
    the main process creates it and passes :attr:`staging` to the others, every process writes its files there,
    and after a barrier the main process calls :meth:`commit` (or :meth:`abort`).

    Args:
        target: the bundle directory. A symbolic link to a directory is followed (the bundle is saved where it
            points and the link still points there); a dangling link, a file or the root are refused with a
            ``ValueError``.
        keep_other_files: bring the old target's files that the new save does not write into the new bundle (the
            default, for user-facing bundles). ``False`` makes the target exactly what was written (checkpoints:
            nothing of an earlier run survives in them).
    """

    def __init__(self, target, keep_other_files: bool = True):
        if not isinstance(keep_other_files, bool):
            raise TypeError(f"keep_other_files must be True or False, got {keep_other_files!r}.")
        self.target = _resolve_target(target)
        self.keep_other_files = keep_other_files
        self.nested = _inside_active_staging(self.target)
        self.in_place = False
        self._done = False
        parent = os.path.dirname(self.target)
        if self.nested:
            os.makedirs(self.target, exist_ok=True)
            self.staging = self.target
            return
        os.makedirs(parent, exist_ok=True)
        reason = None
        if os.path.isdir(self.target) and os.path.ismount(self.target):
            reason = "it is a mount point"
        else:
            try:
                self.staging = _make_directory(parent, os.path.basename(self.target), "staging")
            except PermissionError:
                if not os.path.isdir(self.target):
                    raise
                reason = f"this process may not write to its parent {parent!r}"
        if reason is not None:
            self._start_in_place(reason)
        _set_active(self.staging, True)

    def _start_in_place(self, reason: str) -> None:
        logger.warning(
            "%s cannot be replaced as a whole (%s): its files are replaced one by one, so a crash mid-save can leave "
            "files of two saves side by side. Save into a subfolder to get whole-bundle atomic saves.",
            self.target,
            reason,
        )
        self.in_place = True
        _clean_temporaries(self.target, stem="save")
        self.staging = _make_directory(self.target, "save", "staging")

    def commit(self) -> str:
        """Make the staged bundle the target (see the module docstring for the guarantees); returns the target."""
        if self._done:
            raise RuntimeError(f"the save into {self.target!r} was already committed or aborted.")
        self._done = True
        if self.nested:
            return self.target
        try:
            if self.in_place:
                self._commit_in_place()
            else:
                self._commit_swap()
        finally:
            _set_active(self.staging, False)
            _remove_tree(self.staging)  # after a swap this path holds the old bundle
        return self.target

    def abort(self) -> None:
        """Drop the staged files; the target stays as it was."""
        if self._done:
            return
        self._done = True
        if not self.nested:
            _set_active(self.staging, False)
            _remove_tree(self.staging)

    def __enter__(self) -> str:
        return self.staging

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def _commit_swap(self) -> None:
        target, staging = self.target, self.staging
        parent = os.path.dirname(target)
        _fsync_tree(staging)  # the saver's files, written with plain open(), before they can become the bundle
        try:
            cwd = os.getcwd()
        except OSError:
            cwd = None
        with _locked(parent):
            _clean_temporaries(parent, target=target)
            if os.path.lexists(target):
                if not os.path.isdir(target) or os.path.islink(target):
                    raise ValueError(f"save directory {target!r} was replaced by a file during the save.")
                if self.keep_other_files:
                    _carry_over(target, staging)
                    _fsync_tree(staging, files=False)
                os.chmod(staging, stat.S_IMODE(os.stat(target).st_mode))
                try:
                    exchanged = _rename_exchange(staging, target)
                except OSError as error:
                    if error.errno != errno.EXDEV:
                        raise
                    self._commit_across_devices()
                    return
                if not exchanged:
                    aside = _new_name(parent, os.path.basename(target), "old")
                    os.rename(target, aside)
                    try:
                        os.rename(staging, target)
                    except BaseException:
                        os.rename(aside, target)
                        raise
                    _fsync_path(parent, directory=True)
                    _remove_tree(aside)
            else:
                os.rename(staging, target)
            _fsync_path(parent, directory=True)
            _restore_working_directory(cwd, target)

    def _commit_across_devices(self) -> None:
        logger.warning(
            "%s is on another file system than its parent (a bind mount?): its files are replaced one by one.",
            self.target,
        )
        self._install_files(self.staging, self.target)

    def _commit_in_place(self) -> None:
        _fsync_tree(self.staging)
        self._install_files(self.staging, self.target)

    @staticmethod
    def _install_files(staging: str, target: str) -> None:
        for root, directories, files in os.walk(staging):
            relative = os.path.relpath(root, staging)
            destination_dir = target if relative == "." else os.path.join(target, relative)
            os.makedirs(destination_dir, exist_ok=True)
            for name in files:
                _replace_in(destination_dir, os.path.join(root, name), os.path.join(destination_dir, name))
            for name in directories:
                os.makedirs(os.path.join(destination_dir, name), exist_ok=True)
            _fsync_path(destination_dir, directory=True)


def carry_into_staging(target: str, staging: str, name: str) -> None:
    """Copy ``target``'s existing file ``name`` into ``staging`` before a save that updates it in place (PEFT's
    model card), so the user's edits survive the swap. A save nested in another's staging folder writes straight
    into it (``staging`` is ``target``): nothing to copy."""
    existing = os.path.join(target, name)
    if os.path.isfile(existing) and os.path.realpath(staging) != os.path.realpath(target):
        shutil.copy2(existing, os.path.join(staging, name))


@contextmanager
def atomic_directory(target, keep_other_files: bool = True) -> Iterator[str]:
    """Yield a staging directory; when the block ends without an exception, it replaces ``target`` as a whole.

    ``with atomic_directory(path) as staging: model.save_pretrained(staging)``. An exception in the block leaves
    ``target`` as it was. See :class:`AtomicDirectory` for the arguments and the module docstring for what is
    guaranteed where. A save into a staging directory of a save in progress (a bundle that saves a sub-bundle into
    its own staging directory) writes there directly: the enclosing save makes the whole atomic.
    """
    save = AtomicDirectory(target, keep_other_files=keep_other_files)
    try:
        yield save.staging
    except BaseException:
        save.abort()
        raise
    save.commit()
