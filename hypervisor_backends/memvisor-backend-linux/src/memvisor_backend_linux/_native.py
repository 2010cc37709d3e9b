"""The compiled helpers (``native.c``), built with cffi at first use and cached.

The extension is compiled once per source version into a cache directory
(``$MEMVISOR_LINUX_CACHE``, else ``$XDG_CACHE_HOME/memvisor-backend-linux``, else
``~/.cache/memvisor-backend-linux``), in a folder named after the hash of the source and the
Python version; later imports (memvisor's and every guest process's) load the built module. A
file lock makes concurrent first uses build it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import sys
import sysconfig
from pathlib import Path

CDEF = """
int mv_uffd_open(int flags);
int mv_uffd_api(int fd, uint64_t features, uint64_t *got_features, uint64_t *got_ioctls);
int mv_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls);
int mv_die_with_parent(int expected_parent);
int mv_punch_hole(int fd, uint64_t offset, uint64_t len);
int mv_allocate(int fd, uint64_t offset, uint64_t len);
int64_t mv_map_aligned(int fd, uint64_t size, int prot);
int mv_madvise(uint64_t addr, uint64_t len, int advice);
int64_t mv_resolve_runs(int uffd, int kind, uint64_t base, const int64_t *gpps, int64_t n, const uint8_t *src, int wp);
int64_t mv_protect_runs(int uffd, uint64_t base, const int64_t *gpps, int64_t n, int wp);
int64_t mv_wake_runs(int uffd, uint64_t base, const int64_t *gpps, int64_t n);
int64_t mv_punch_runs(int fd, const int64_t *gpps, int64_t n);
int64_t mv_take_written(int pagemap_fd, uint64_t base, uint64_t start, uint64_t end, uint8_t *dirty);
struct mv_serve_ctx {
    int uffd;
    int sock;
    uint64_t base;
    uint64_t npages;
    uint8_t *state;
    const uint8_t *stage;
    int64_t block_pages;
    int64_t *out_pages;
    uint8_t *out_flags;
    int64_t out_cap;
    int64_t out_n;
    int64_t *log_pages;
    uint8_t *log_writes;
    int64_t log_cap;
    int64_t log_n;
    int64_t served_minor;
    int64_t served_staged;
    int64_t ioctls;
    int64_t events;
};
int mv_serve(struct mv_serve_ctx *c, int timeout_ms);
void mv_touch_timed(const uint8_t *base, const int64_t *gpps, int64_t n, int64_t *ns_out);
int mv_wakeup_roundtrip(int64_t iters, int64_t *ns_out);
"""

SOURCE_PATH = Path(__file__).with_name("native.c")

_module = None


def cache_dir() -> Path:
    """Where built extensions are kept."""
    explicit = os.environ.get("MEMVISOR_LINUX_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "memvisor-backend-linux"


def _build_dir() -> tuple[Path, str]:
    source = SOURCE_PATH.read_bytes() + CDEF.encode()
    tag = hashlib.sha256(source + sys.version.encode() + sysconfig.get_platform().encode()).hexdigest()[:16]
    return cache_dir() / tag, "_memvisor_linux_native"


def load():
    """The compiled module (``.ffi`` and ``.lib``), building it on first use."""
    global _module
    if _module is not None:
        return _module
    folder, name = _build_dir()
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    built = folder / (name + suffix)
    if not built.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not built.exists():
                _compile(folder, name)
    spec = importlib.util.spec_from_file_location(name, built)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _module = module
    return module


def _compile(folder: Path, name: str) -> None:
    import cffi  # build-time only: loading the built module needs just cffi's backend

    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source(name, SOURCE_PATH.read_text(), extra_compile_args=["-O2", "-Wall"], libraries=["pthread"])
    tmp = folder / f"build-{os.getpid()}"
    out = ffi.compile(tmpdir=str(tmp), verbose=False)
    os.replace(out, folder / Path(out).name)
    shutil.rmtree(tmp, ignore_errors=True)
