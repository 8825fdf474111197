"""Crash-safe saving: single files replaced atomically, whole bundle directories swapped in as a whole.

What a user relies on, if the saving process is killed (SIGKILL, OOM killer) at any instant:

* :func:`atomic_write_text`, :func:`atomic_save_safetensors`: the destination is the old or the new complete file
  (a temporary file beside it, then ``os.replace``).
* :func:`atomic_directory` (``with atomic_directory(target) as staging: <write the bundle into staging>``): the
  bundle switches as a whole, the old one or the new one, never files of two saves side by side. The bundle is built
  in a staging folder beside the target, the old bundle's other files (the user's own, ``base_model/``, an edited
  README) are hard-linked into it unless ``keep_other_files=False``, and the two folders are swapped.
* the next save into a folder removes what killed saves left there.
* new files and folders get ``0o666`` / ``0o777`` less the umask, whoever wrote them (safetensors >= 0.8 writes
  ``0o600`` whatever the umask); a re-saved bundle folder keeps the permissions of the one it replaces.

Each part below is here for a test that fails without it (``tests/test_atomic.py`` unless named otherwise):

* **one-call swap** (``renameat2(RENAME_EXCHANGE)`` through ctypes, Linux): at every instant the target names a
  complete bundle, for readers too. ``test_concurrent_savers_never_mix_their_bundles`` (a reader finds no folder)
  and ``test_a_save_killed_at_any_instant...[exchange]`` (a kill between two renames leaves no bundle).
* **two renames, with recovery** (``target -> aside``, ``staging -> target``; :func:`recover_interrupted_save`, also
  run by the next save, renames a dead saver's aside back): where the exchange is refused (other systems, file
  systems without it). ``test_a_save_killed_at_any_instant...[two-renames]``,
  ``test_two_renames_and_recovery_where_exchange_is_unavailable``,
  ``test_a_symlinked_bundle_left_aside_by_a_killed_save_is_recovered``.
* **owner in temporary names** (``.<name>.palora-<kind>-<digest>-<host>-<pid>-<start>-<random>``) and the removal of
  entries whose owner is certainly dead (same host, no such pid, or our own pid with another start time):
  ``test_only_debris_of_dead_owners_of_this_host_is_removed``, the kill loops (``temporaries(...) == []``),
  ``tests/test_killed_runs.py::test_crashes_inside_checkpoint_writes_fall_back_to_the_previous_checkpoint`` (staging
  folders of killed runs gone). The owner is looked up per pid: the fork-server kill loops save from forked children.
  ``.tmp-*`` names of earlier versions: ``test_legacy_temporaries_inside_the_bundle_are_dropped``.
* **carrying the old bundle's other files over**: ``test_files_the_new_save_does_not_write_survive_as_hard_links``,
  ``test_keep_other_files_false_makes_the_target_exactly_the_new_save``.
* **file modes set at commit**: ``test_saved_files_and_folders_honour_the_umask``,
  ``test_a_saved_peft_bundle_follows_the_umask``.
* **a lock on the parent folder** around the swap: two savers of one folder never interleave their renames
  (``test_threads_saving_into_one_folder_never_mix_their_bundles`` for the exchange; the two-rename fallback needs it
  to be safe at all).
* **saves nested in a save in progress** write straight into its staging folder:
  ``test_a_save_inside_a_save_in_progress_writes_into_its_staging_directory`` (a bundle saving a sub-bundle).
* **target checks** (symbolic links followed, files, dangling links, the root refused before anything is written):
  ``test_bad_targets_are_refused_before_anything_is_written``,
  ``test_a_symlinked_target_is_saved_where_it_points_and_stays_a_link``.
* **the working directory follows the swap**: ``test_saving_into_the_working_directory_keeps_it_usable``.
* **files replaced one by one, with a warning**, where the target cannot be swapped (a mount point, a parent folder
  this process may not write to): ``test_a_mount_point_is_saved_file_by_file_with_a_warning``,
  ``test_an_unwritable_parent_is_saved_file_by_file_with_a_warning``.
* **fsync** of new files and folders before they become visible, and of the folder holding them after: no test
  (a power cut cannot be staged here); kept because a node that goes down mid-run is the case checkpoints exist for.

Left out: a target on another file system than its parent that :func:`os.path.ismount` does not see (a bind mount
of the same file system) is refused with a clear ``OSError`` instead of being copied file by file.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable, Iterator
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

_STEM_CHARS = 80  # keeps every temporary name under NAME_MAX (255 bytes)
_DEBRIS = re.compile(
    r"^\..*\.palora-(?P<kind>staging|old|tmp)-(?P<digest>[0-9a-f]{8})-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-"
    r"(?P<start>\d+)-[0-9a-f]{8}(?:\.[A-Za-z0-9]+)?$",
    re.DOTALL,
)
_LEGACY_DEBRIS = re.compile(r"^\.tmp-(?:save-[A-Za-z0-9_]{8}|[A-Za-z0-9_]{8}\.(?:txt|safetensors))$")

# Staging folders of saves in progress in this process: a save into one of them writes there directly.
_ACTIVE_STAGING: set[str] = set()
_ACTIVE_LOCK = threading.Lock()


# ----------------------------------------------------------------------------------------------------------------------
# Owners of temporary entries
# ----------------------------------------------------------------------------------------------------------------------
def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


_HOST = _digest(socket.gethostname())
_own_start: dict[int, int] = {}


def _start_time(pid: int) -> int:
    """The start time of process ``pid`` (clock ticks since boot, from ``/proc``), or 0 where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read().decode("ascii", "replace")
        return int(text[text.rfind(")") + 2 :].split()[19])  # the command name, in parentheses, may hold spaces
    except (OSError, IndexError, ValueError):
        return 0


def _owner() -> str:
    pid = os.getpid()  # looked up on each call: a forked child is another owner
    if pid not in _own_start:
        _own_start[pid] = _start_time(pid)
    return f"{_HOST}-{pid}-{_own_start[pid]}"


def _owner_is_alive(host: str, pid: int, start: int) -> bool:
    """False only when the owner is certainly gone: this host, and no such process or our pid reused."""
    if host != _HOST or os.name != "posix":
        return True  # another machine's pids mean nothing here; on Windows os.kill would terminate the process
    if pid == os.getpid():
        own_start = _own_start.get(pid) or _start_time(pid)
        return start == own_start or 0 in (start, own_start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # EPERM: it exists, under another user
    return True


def _is_temporary(name: str) -> bool:
    return _DEBRIS.match(name) is not None or _LEGACY_DEBRIS.match(name) is not None


def _new_name(directory: str, stem: str, kind: str, suffix: str = "") -> str:
    return os.path.join(
        directory, f".{stem[:_STEM_CHARS]}.palora-{kind}-{_digest(stem)}-{_owner()}-{secrets.token_hex(4)}{suffix}"
    )


# ----------------------------------------------------------------------------------------------------------------------
# File-system primitives
# ----------------------------------------------------------------------------------------------------------------------
def _fsync(path: str, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return  # Windows cannot open folders; their entries are durable once the rename returns
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_directory(parent: str, stem: str, kind: str) -> str:
    while True:
        path = _new_name(parent, stem, kind)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o777)  # the umask applies, as for any os.mkdir
            return path


def _make_file(directory: str, stem: str, suffix: str) -> str:
    while True:
        path = _new_name(directory, stem, "tmp", suffix)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as for open()
            return path


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except FileNotFoundError:
        pass
    except OSError:
        logger.debug("could not remove %s", path, exc_info=True)


_renameat2 = None
if sys.platform.startswith("linux"):
    try:
        _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.2
        _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        _renameat2.restype = ctypes.c_int
    except (AttributeError, OSError):
        _renameat2 = None


def _rename_exchange(first: str, second: str) -> bool:
    """Swap two existing paths in one atomic step; False where the system or the file system cannot."""
    if _renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if _renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
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
    except OSError:  # a folder we may enter but not read
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

    ``stem``: only entries made for that name. ``target``: a bundle folder in ``directory`` whose aside (kind ``old``)
    is renamed back if ``target`` is missing. An aside whose bundle is missing otherwise is the only complete copy
    left: it waits for its own recovery.
    """
    try:
        names = os.listdir(directory)
    except OSError:
        return
    wanted = None if stem is None else _digest(stem)
    target_digest = None if target is None else _digest(os.path.basename(target))
    present = {_digest(name) for name in names if not _is_temporary(name)}
    for name in names:
        match = _DEBRIS.match(name)
        if match is None or (wanted is not None and match["digest"] != wanted):
            continue
        if _owner_is_alive(match["host"], int(match["pid"]), int(match["start"])):
            continue
        path = os.path.join(directory, name)
        if match["kind"] == "old":
            if match["digest"] == target_digest and not os.path.lexists(target):
                try:
                    os.rename(path, target)
                    logger.warning("restored %s from %s, left by an interrupted save", target, path)
                    present.add(target_digest)
                except OSError:
                    logger.warning("could not restore %s from %s", target, path, exc_info=True)
                continue
            if match["digest"] not in present:
                continue
        _remove(path)


def recover_interrupted_save(target) -> bool:
    """Put back a bundle folder that a save killed between its two renames left aside; True if one was.

    Only needed where ``RENAME_EXCHANGE`` is unavailable; the next save into the same folder does the same. A loader
    may call it before reading ``target``.
    """
    path = os.path.realpath(os.fspath(target))  # a link to the bundle dangles while the bundle is aside
    parent = os.path.dirname(path)
    if os.path.lexists(path) or not os.path.isdir(parent):
        return False
    with _locked(parent):
        _clean_temporaries(parent, stem=os.path.basename(path), target=path)
    return os.path.isdir(path)


# ----------------------------------------------------------------------------------------------------------------------
# Single files
# ----------------------------------------------------------------------------------------------------------------------
def _temp_path_beside(path: str, suffix: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    return _make_file(directory, os.path.basename(path), suffix)


def _finish_file(tmp_path: str, path: str) -> None:
    _fsync(tmp_path)
    os.replace(tmp_path, path)
    directory = os.path.dirname(os.path.abspath(path))
    _fsync(directory, directory=True)
    _clean_temporaries(directory, stem=os.path.basename(path))


def _write_atomically(path: str, suffix: str, write: Callable[[str], None]) -> None:
    """``write(temporary path)``, then the temporary file replaces ``path``; removed instead if anything fails."""
    tmp_path = _temp_path_beside(path, suffix)
    try:
        write(tmp_path)
        _finish_file(tmp_path, path)
    except BaseException:
        _remove(tmp_path)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8); the file gets the permissions ``open(path, "w")`` would."""

    def write(tmp_path: str) -> None:
        with open(tmp_path, "w", encoding="utf-8") as handle:
            handle.write(text)

    _write_atomically(path, ".txt", write)


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` to ``path`` atomically, with the permissions a plain ``open()`` would give."""
    from safetensors.torch import save_file  # imported here: saving bundles of plain files needs no torch

    def write(tmp_path: str) -> None:
        mode = stat.S_IMODE(os.stat(tmp_path).st_mode)  # what the kernel gave a new file under the umask
        save_file(tensors, tmp_path, metadata=metadata)
        os.chmod(tmp_path, mode)  # safetensors >= 0.8 writes its files -rw------- whatever the umask

    _write_atomically(path, ".safetensors", write)


# ----------------------------------------------------------------------------------------------------------------------
# Whole directories
# ----------------------------------------------------------------------------------------------------------------------
def _resolve_target(target) -> str:
    if isinstance(target, bytes):
        target = os.fsdecode(target)
    if not isinstance(target, (str, os.PathLike)):
        raise TypeError(f"save directory must be a path (str or os.PathLike), got {type(target).__name__}.")
    path = os.fsdecode(os.fspath(target))
    if not path:
        raise ValueError("save directory must not be empty; give a directory such as './my-bundle'.")
    if os.path.islink(path) and not os.path.exists(path) and not recover_interrupted_save(path):
        raise ValueError(f"save directory {path!r} is a symbolic link to {os.readlink(path)!r}, which does not exist.")
    real = os.path.realpath(path)  # a link to a folder: the bundle is saved where it points, the link stays
    if os.path.exists(real) and not os.path.isdir(real):
        raise ValueError(f"save directory {path!r} is a file, not a directory; give a directory.")
    if os.path.dirname(real) == real:
        raise ValueError(f"save directory {path!r} is the root of the file system; give a folder for the bundle.")
    return real


def _inside_active_staging(path: str) -> bool:
    with _ACTIVE_LOCK:
        return any(path == staging or path.startswith(staging + os.sep) for staging in _ACTIVE_STAGING)


def _prepare_new_files(staging: str, folder_mode: int) -> None:
    """Give every file the save wrote the mode a plain ``open()`` would have (``folder_mode`` is the staging folder's
    own mode, ``0o777`` less the umask, so no umask is read), then fsync files and folders, children first."""
    for directory, _, names in os.walk(staging, topdown=False):
        for name in names:
            path = os.path.join(directory, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                os.chmod(path, folder_mode & (0o777 if mode & 0o111 else 0o666))
                _fsync(path)
        _fsync(directory, directory=True)


def _carry_over(old_root: str, new_root: str) -> None:
    """Bring every entry of ``old_root`` that ``new_root`` lacks into it: hard links (copies where impossible) for
    files, the same target for symbolic links, folders (with their mode) filled recursively. Temporaries, and what is
    neither a file, a link nor a folder, are left out."""
    pending = [(old_root, new_root)]
    created: list[tuple[str, int]] = []
    while pending:
        old_dir, new_dir = pending.pop()
        with os.scandir(old_dir) as scan:
            entries = list(scan)
        for entry in entries:
            destination = os.path.join(new_dir, entry.name)
            if _is_temporary(entry.name):
                continue
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode):
                if not os.path.lexists(destination):
                    os.mkdir(destination, 0o700)  # writable while it is filled; given the old mode below
                    created.append((destination, stat.S_IMODE(mode)))
                elif not (os.path.isdir(destination) and not os.path.islink(destination)):
                    continue  # the new save wrote a file where the old bundle had a folder: the new one wins
                pending.append((entry.path, destination))
            elif os.path.lexists(destination):
                continue  # written by the new save
            elif stat.S_ISLNK(mode):
                os.symlink(os.readlink(entry.path), destination)
            elif stat.S_ISREG(mode):
                try:
                    os.link(entry.path, destination)
                except OSError:
                    shutil.copy2(entry.path, destination)
    for path, mode in reversed(created):
        os.chmod(path, mode)


class AtomicDirectory:
    """A staging folder for a new version of ``target``, swapped in as a whole by :meth:`commit`.

    :func:`atomic_directory` is the usual way to use it. The class form is for savers in several processes: the main
    process creates it and passes :attr:`staging` to the others, every process writes its files there, and after a
    barrier the main process calls :meth:`commit` (or :meth:`abort`).

    Args:
        target: the bundle folder. A symbolic link to a folder is followed (the bundle is saved where it points and
            the link still points there); a dangling link, a file or the root are refused with a ``ValueError``.
        keep_other_files: bring the old target's files that the new save does not write into the new bundle (the
            default, for user-facing bundles). ``False`` makes the target exactly what was written (checkpoints).
    """

    def __init__(self, target, keep_other_files: bool = True):
        if not isinstance(keep_other_files, bool):
            raise TypeError(f"keep_other_files must be True or False, got {keep_other_files!r}.")
        self.target = _resolve_target(target)
        self.keep_other_files = keep_other_files
        self.nested = _inside_active_staging(self.target)
        self.in_place = False
        self._done = False
        if self.nested:  # the enclosing save makes the whole atomic
            os.makedirs(self.target, exist_ok=True)
            self.staging = self.target
            return
        parent = os.path.dirname(self.target)
        os.makedirs(parent, exist_ok=True)
        if os.path.isdir(self.target) and os.path.ismount(self.target):
            self._start_in_place("it is a mount point")
        else:
            try:
                self.staging = _make_directory(parent, os.path.basename(self.target), "staging")
            except PermissionError:
                if not os.path.isdir(self.target):
                    raise
                self._start_in_place(f"this process may not write to its parent {parent!r}")
        self._folder_mode = stat.S_IMODE(os.stat(self.staging).st_mode)  # 0o777 less the umask
        with _ACTIVE_LOCK:
            _ACTIVE_STAGING.add(self.staging)

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
            _prepare_new_files(self.staging, self._folder_mode)
            if self.in_place:
                self._install_files()
            else:
                self._swap()
        finally:
            self._drop_staging()  # after a swap this path holds the old bundle
        return self.target

    def abort(self) -> None:
        """Drop the staged files; the target stays as it was."""
        if not self._done:
            self._done = True
            if not self.nested:
                self._drop_staging()

    def _drop_staging(self) -> None:
        with _ACTIVE_LOCK:
            _ACTIVE_STAGING.discard(self.staging)
        _remove(self.staging)

    def __enter__(self) -> str:
        return self.staging

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def _swap(self) -> None:
        target, staging = self.target, self.staging
        parent = os.path.dirname(target)
        try:
            cwd = os.getcwd()
        except OSError:
            cwd = None
        with _locked(parent):
            _clean_temporaries(parent, target=target)
            if not os.path.lexists(target):
                os.rename(staging, target)
            elif not os.path.isdir(target) or os.path.islink(target):
                raise ValueError(f"save directory {target!r} was replaced by a file during the save.")
            else:
                if self.keep_other_files:
                    _carry_over(target, staging)
                    _fsync(staging, directory=True)
                os.chmod(staging, stat.S_IMODE(os.stat(target).st_mode))
                try:
                    exchanged = _rename_exchange(staging, target)
                except OSError as error:
                    if error.errno != errno.EXDEV:
                        raise
                    message = "on another file system than its parent (a bind mount?): save into a subfolder of it"
                    raise OSError(errno.EXDEV, message, target) from error
                if not exchanged:
                    aside = _new_name(parent, os.path.basename(target), "old")
                    os.rename(target, aside)
                    try:
                        os.rename(staging, target)
                    except BaseException:
                        os.rename(aside, target)
                        raise
                    _fsync(parent, directory=True)
                    _remove(aside)
            _fsync(parent, directory=True)
        if cwd is not None and (cwd == target or cwd.startswith(target + os.sep)):
            for path in (cwd, target):  # a process working inside the old bundle follows the swap
                try:
                    os.chdir(path)
                    break
                except OSError:
                    continue

    def _install_files(self) -> None:
        for root, directories, files in os.walk(self.staging):
            relative = os.path.relpath(root, self.staging)
            destination = self.target if relative == "." else os.path.join(self.target, relative)
            for name in directories:
                os.makedirs(os.path.join(destination, name), exist_ok=True)
            for name in files:
                os.replace(os.path.join(root, name), os.path.join(destination, name))
            _fsync(destination, directory=True)


def carry_into_staging(target: str, staging: str, name: str) -> None:
    """Copy ``target``'s existing file ``name`` into ``staging`` before a save that updates it in place (PEFT's
    model card), so the user's edits survive the swap. A save nested in another's staging folder writes straight
    into it (``staging`` is ``target``): nothing to copy."""
    existing = os.path.join(target, name)
    if os.path.isfile(existing) and os.path.realpath(staging) != os.path.realpath(target):
        shutil.copy2(existing, os.path.join(staging, name))


def atomic_directory(target, keep_other_files: bool = True) -> AtomicDirectory:
    """A staging folder (``as`` gives its path); when the block ends without an exception, it replaces ``target`` as
    a whole.

    ``with atomic_directory(path) as staging: model.save_pretrained(staging)``. An exception in the block leaves
    ``target`` as it was. See :class:`AtomicDirectory` for the arguments and the module docstring for the guarantees.
    A save into the staging folder of a save in progress writes there directly: the enclosing save makes the whole
    atomic.
    """
    return AtomicDirectory(target, keep_other_files=keep_other_files)
