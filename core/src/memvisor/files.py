"""Files and names that come from input: names that become paths stay inside their folder,
inputs are regular files, an output is never one of the inputs, and temporary files and
folders are removed on SIGTERM/SIGINT and, after a kill, by the next run.

Every place where input becomes a path goes through here: checkpoint names and VM names
(:func:`safe_name`, :func:`path_inside`), the files a command reads and writes
(:func:`open_regular`, :func:`check_output`, :func:`refuse_same_file`, :func:`check_out_dir`),
the sockets of other programs it connects to (:func:`check_socket`),
raw memory images (:func:`image_pages`) and temporaries (:func:`temp_file`,
:func:`temp_dir`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import stat
import tempfile
from pathlib import Path

from memvisor import PAGE_SIZE
from memvisor.errors import UserError

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
"""A name that may become a file name as it is: 1-64 ASCII letters, digits, ``.``, ``_`` and
``-``, starting with a letter or digit (so no separator, no ``..``, no hidden or absolute
path, nothing a shell or a report page would read differently)."""


def safe_name(value: object, what: str = "a name") -> str:
    """``value`` when it is a :data:`SAFE_NAME`; else ``ValueError`` saying why."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {value!r}")
    if not SAFE_NAME.match(value):
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise ValueError(f"{what} {shown!r} may hold only letters, digits, '.', '_' and '-' (at most 64, "
                         f"starting with a letter or digit): it becomes a file name")
    return value


def path_inside(folder: str | os.PathLike, name: str, suffix: str = "", what: str = "a name") -> Path:
    """``folder/name+suffix`` for a :func:`safe_name` ``name``, checked to lie in ``folder``
    (``ValueError`` otherwise)."""
    folder = Path(folder)
    path = folder / (safe_name(name, what) + suffix)
    if path.resolve().parent != folder.resolve():  # a link named like the file points elsewhere
        raise ValueError(f"{what} {name!r} leads outside {folder}")
    return path


# -- inputs -------------------------------------------------------------------------------------


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _user_error(path, problem: str) -> Exception:
    return UserError(f"{path}: {problem}")


def open_regular(path: str | os.PathLike, what: str = "file", error=_user_error) -> int:
    """A descriptor of ``path`` open for reading, which must be a regular file. Opening never
    blocks (a FIFO would block a reader forever) and the check is on the open file, so a path
    swapped meanwhile cannot slip through. Raises ``error(path, problem)`` (a
    :class:`UserError` by default)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        problem = f"no such {what}" if exc.errno == errno.ENOENT else f"cannot open {what}: {exc.strerror or exc}"
        raise error(path, problem) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(path, f"{_kind(mode)}, not a regular file: a {what} must be a regular file")
    os.set_blocking(fd, True)
    return fd


def check_regular(path: str | os.PathLike, what: str = "file") -> int:
    """The size of ``path`` when it is a regular file (:class:`UserError` otherwise)."""
    fd = open_regular(path, what)
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def read_regular(path: str | os.PathLike, what: str, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (:class:`UserError` otherwise)."""
    fd = open_regular(path, what)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{path}: a {what} of more than {limit >> 20} MiB")
    return data


def image_pages(path: str | os.PathLike, what: str = "memory image") -> int:
    """Pages of a raw memory image: a regular file of a whole, positive number of 4 KiB
    pages (:class:`UserError` otherwise: an image is never silently cut)."""
    size = check_regular(path, what)
    if size == 0:
        raise UserError(f"{path}: an empty file; a {what} needs at least one 4 KiB page")
    if size % PAGE_SIZE:
        raise UserError(f"{path}: {size} bytes is not a whole number of 4 KiB pages; a {what} is "
                        f"guest memory from address 0, page after page")
    return size // PAGE_SIZE


MAX_SOCKET_PATH = 107
"""The longest path a Unix socket can be reached by (``sun_path`` holds 108 bytes with its NUL)."""


def check_socket(path: str | os.PathLike, what: str = "Unix socket") -> None:
    """:class:`UserError` unless ``path`` is a Unix socket (another program's, e.g. a QEMU's QMP
    socket) that can be connected to: it exists, is a socket, and its path fits in
    :data:`MAX_SOCKET_PATH` bytes."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what}") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot use the {what}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(mode):
        kind = "a regular file" if stat.S_ISREG(mode) else _kind(mode)
        raise UserError(f"{path}: {kind}, not a socket: the {what} must be a Unix socket")
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise UserError(f"{path}: a path of more than {MAX_SOCKET_PATH} bytes, too long to connect to a Unix "
                        f"socket: give a shorter one (relative, or through a link)")


# -- outputs ------------------------------------------------------------------------------------


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` are the same file: the same path once links are resolved, or
    the same inode (hard links)."""
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def refuse_same_file(output: str | os.PathLike, inputs, what: str = "output") -> None:
    """:class:`UserError` when ``output`` is one of ``inputs`` (also through links): writing it
    would destroy the input."""
    for item in inputs:
        if item is not None and same_file(output, item):
            raise UserError(f"{output}: the {what} is the input {item}; writing it would destroy the input")


def check_output(path: str | os.PathLike, what: str = "output file") -> None:
    """:class:`UserError` unless ``path`` can be written as a regular file: its folder exists
    and it is absent or a regular file (never a FIFO or a device), its name not too long."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        parent = path.parent
        if not parent.is_dir():
            raise UserError(f"{path}: no folder {parent} for the {what}") from None
        if len(path.name.encode()) > _name_max(parent):
            raise UserError(f"{path}: the name of the {what} is too long") from None
        return
    except OSError as exc:
        raise UserError(f"{path}: cannot write the {what}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path}: {_kind(st.st_mode)}; the {what} must be a regular file")


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_out_dir(path: str | os.PathLike, what: str = "output folder") -> None:
    """:class:`UserError` unless files can be written in folder ``path``, checked before any
    work: the folder is created if needed, a probe file written and removed, and what was
    created removed again (so a run whose output cannot be written fails at once, not after)."""
    path = Path(path)
    created = []
    try:
        missing = path
        while not missing.exists() and missing != missing.parent:
            created.append(missing)
            missing = missing.parent
        if path.exists() and not path.is_dir():
            raise UserError(f"{path}: not a folder; the {what} must be a folder")
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".memvisor-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{path}: cannot write the {what}: {exc.strerror or exc}") from None
    finally:
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()


# -- temporaries --------------------------------------------------------------------------------

TEMP_MARK = "memvisor-tmp"
"""The mark in the name of every temporary memvisor writes beside an output."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(name: str, prefix: str) -> bool:
    """Whether ``name`` (``PREFIX.PID.*``) is a temporary of a process that is gone."""
    rest = name[len(prefix):]
    pid_text = rest.split(".", 1)[0]
    return pid_text.isdigit() and int(pid_text) != os.getpid() and not _alive(int(pid_text))


def remove_stale(folder: str | os.PathLike, prefix: str) -> int:
    """Remove the temporaries named ``PREFIX.PID.*`` in ``folder`` whose process is gone (it
    was killed before it could clean up); returns how many."""
    removed = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        if name.startswith(prefix) and _stale(name, prefix):
            target = os.path.join(folder, name)
            with contextlib.suppress(OSError):
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)
                else:
                    os.unlink(target)
                removed += 1
    return removed


def temp_file(final: str | os.PathLike) -> tuple[int, str]:
    """``(fd, path)`` of a new temporary file (mode 0600) beside ``final``, named
    ``.NAME.memvisor-tmp.PID.RANDOM`` so that the next writer of ``final`` removes it if this
    process is killed before it can; stale ones of ``final`` are removed first."""
    final = Path(final)
    prefix = f".{final.name}.{TEMP_MARK}."
    remove_stale(final.parent, prefix)
    return tempfile.mkstemp(dir=final.parent, prefix=f"{prefix}{os.getpid()}.", suffix=".tmp")


def atomic_write(path: str | os.PathLike, data) -> None:
    """Write ``path`` whole or not at all: ``data`` (bytes, text, or ``data(file)`` writing to
    a binary file) goes to a :func:`temp_file` beside it, which is renamed over ``path`` once
    complete; on failure it is removed and ``path`` left as it was."""
    fd, tmp = temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # a report is as readable as any file its user writes
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def temp_dir(kind: str) -> tempfile.TemporaryDirectory:
    """A private temporary folder ``memvisor-KIND.PID.RANDOM`` in the system's temp folder,
    removed when it is cleaned up or at exit (SIGTERM included, see
    :func:`cleanup_on_signals`); the stale ones of killed processes are removed first."""
    prefix = f"memvisor-{kind}."
    remove_stale(tempfile.gettempdir(), prefix)
    return tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}.")


class Terminated(SystemExit):
    """SIGTERM (or SIGHUP) arrived: raised in the main thread so that every ``finally`` and
    context manager runs (temporary files removed, outputs left as they were)."""


def cleanup_on_signals() -> None:
    """Make SIGTERM and SIGHUP unwind the main thread like SIGINT does (exit status 128 +
    the signal), so temporaries are removed; called by the ``memvisor`` command."""

    def handler(signum, frame):
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once
        raise Terminated(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):  # not the main thread
            signal.signal(sig, handler)
