"""Disclosure, not proof: which files a recipe opens while it is imported and while it builds a model.

A recipe is the trainer's code. Its ``build_model(seed)`` may read a foreign checkpoint and return it
(plus noise, or permuted); ``init``'s statistical tests are the proof against that, this module is
only a witness that names what it saw. :func:`watch_files` records, while it is active:

- **audit events** (:func:`sys.addaudithook`): ``open`` (``open``, ``io.open``, ``os.open``,
  ``io.open_code``; ``torch.load``, ``numpy.load`` and ``pickle`` on a path go through it) and
  ``mmap.__new__`` (the file behind the descriptor, read from ``/proc/self/fd``);
- **mapped files**: ``/proc/self/maps`` before and after (Linux; nothing elsewhere). ``safetensors``
  and ``torch.from_file`` open and memory-map in native code without an audit event; a mapping still
  alive when the watch ends is seen here;
- **paths handed to Python functions**: while watching, a profile function (:func:`sys.setprofile`,
  only when no other profiler is installed) looks at the first argument of every Python call and
  records it when it names an existing weights-like file: ``safetensors.torch.load_file(path)``
  unmaps its file before returning, so neither of the above would see it.

What it cannot see: native code that opens a file by a path it was not handed as a first argument of
a Python function (``torch.from_file`` called directly and its mapping dropped before the watch ends,
a C extension of the recipe's own), weights embedded in the recipe file or in an installed package,
weights received over a socket, or files a child process opens. Files under the Python installation
and its site-packages and the recipe file itself are left out; weights-like ones (:data:`WEIGHTS_SUFFIXES`)
are flagged. Audit hooks cannot be removed, so one process-wide hook is installed on first use and
records only while a watch is active (any thread).
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, cast

WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz", ".npy", ".pkl", ".gguf")
MAPS = "/proc/self/maps"
PSEUDO = ("/proc/", "/sys/", "/dev/")  # not files a recipe reads weights from

_lock = threading.Lock()
_active: list[Watch] = []
_installed = False
_inside = threading.local()  # set while the hook itself runs (it must not record its own reads)


def weights_like(path: str) -> bool:
    """A file name that weights are commonly stored under (safetensors, pickles, numpy, GGUF …)."""
    return path.lower().endswith(WEIGHTS_SUFFIXES)


class Watch:
    """The files seen while one :func:`watch_files` block ran (thread-safe; read after the block)."""

    def __init__(self, ignore: Iterable[str | os.PathLike[str]] = ()) -> None:
        self._ignore = {os.path.realpath(p) for p in ignore}
        self._seen: dict[str, None] = {}  # insertion-ordered set of absolute paths
        self._lock = threading.Lock()

    def add(self, path: str) -> None:
        """Record one path (the hooks call this)."""
        with self._lock:
            self._seen.setdefault(path, None)

    @property
    def files(self) -> tuple[str, ...]:
        """Regular files seen, in the order first seen, without those of the Python installation,
        its site-packages and the ignored ones (the recipe file)."""
        with self._lock:
            seen = list(self._seen)
        roots = _installation_roots()
        out = []
        for path in seen:
            real = os.path.realpath(path)
            if real in self._ignore or real.startswith(PSEUDO) or not os.path.isfile(real):
                continue
            if any(real == root or real.startswith(root + os.sep) for root in roots):
                continue
            out.append(real)
        return tuple(dict.fromkeys(out))

    @property
    def weights(self) -> tuple[str, ...]:
        """The weights-like files among :attr:`files`."""
        return tuple(f for f in self.files if weights_like(f))


def _installation_roots() -> tuple[str, ...]:
    """Folders whose files are the interpreter's and installed packages', never the recipe's."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sysconfig.get_paths().values()}
    try:
        roots.update(site.getsitepackages())
    except AttributeError:  # some virtualenv builds lack it
        pass
    user = site.getusersitepackages()
    if isinstance(user, str):
        roots.add(user)
    return tuple(sorted({os.path.realpath(r) for r in roots if r}))


def _mapped_files() -> set[str]:
    """Files mapped into this process (empty where /proc is not there)."""
    try:
        with open(MAPS, encoding="utf-8", errors="replace") as maps:
            lines = maps.readlines()
    except OSError:
        return set()
    out = set()
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/"):
            out.add(parts[5].rstrip("\n").removesuffix(" (deleted)"))
    return out


def _record(path: Any) -> None:
    watches = tuple(_active)
    if not watches:
        return
    if isinstance(path, int):
        try:
            path = os.readlink(f"/proc/self/fd/{path}")
        except OSError:
            return
    if isinstance(path, (bytes, os.PathLike)):
        path = os.fsdecode(path)
    if not isinstance(path, str) or not path:
        return
    path = os.path.abspath(path)
    for watch in watches:
        watch.add(path)


def _audit(event: str, args: tuple[Any, ...]) -> None:
    """The process-wide audit hook: cheap when no watch is active, never raises."""
    if not _active or getattr(_inside, "busy", False):
        return
    if event not in ("open", "mmap.__new__") or not args:
        return
    _inside.busy = True
    try:
        if event == "open":
            _record(args[0])
        elif isinstance(args[0], int) and args[0] >= 0:
            _record(args[0])
    except Exception:  # an audit hook that raises aborts the audited operation
        pass
    finally:
        _inside.busy = False


def _profile(frame: FrameType, event: str, arg: Any) -> None:
    """While watching: record the first argument of a Python call when it names a weights-like file."""
    if event != "call" or not _active:
        return
    code = frame.f_code
    if code.co_argcount == 0:
        return
    value = frame.f_locals.get(code.co_varnames[0])
    kind = type(value)
    if kind is str or (kind is not bytes and hasattr(kind, "__fspath__")):  # on the type: no instance attribute
        try:
            path = os.fspath(cast("str | os.PathLike[str]", value))
            if isinstance(path, str) and weights_like(path) and os.path.isfile(path):
                _record(path)
        except Exception:
            pass


def _install() -> None:
    global _installed
    with _lock:
        if not _installed:
            sys.addaudithook(_audit)
            _installed = True


@contextmanager
def watch_files(ignore: Iterable[str | os.PathLike[str]] = ()) -> Iterator[Watch]:
    """Record the files opened or mapped while the block runs (see the module docstring); ``ignore``
    names files not to report (the recipe file). Nested and concurrent watches each see every file."""
    _install()
    watch = Watch(ignore)
    before = _mapped_files()
    profiled = sys.getprofile() is None and threading.getprofile() is None
    with _lock:
        _active.append(watch)
    if profiled:
        sys.setprofile(_profile)
        threading.setprofile(_profile)
    try:
        yield watch
    finally:
        if profiled:
            sys.setprofile(None)
            threading.setprofile(None)
        for path in sorted(_mapped_files() - before):
            watch.add(path)
        with _lock:
            _active.remove(watch)


def describe(files: Iterable[str], root: str | os.PathLike[str] | None = None, limit: int = 4) -> str:
    """File names for a sentence: at most ``limit``, relative to ``root`` when under it."""
    names = []
    for f in files:
        try:
            names.append(str(Path(f).relative_to(root)) if root is not None else f)
        except ValueError:
            names.append(f)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
