"""A guest: one process whose memory is a memfd mapping that memvisor also holds.

Started by :class:`memvisor_backend_linux.backend.LinuxBackend` as
``python -m memvisor_backend_linux.guest SOCKET_FD MEMFD PAGES PARENT_PID``. It

1. asks the kernel to kill it when memvisor dies (``PR_SET_PDEATHSIG``), so that a guest never
   outlives its fault handler: it neither hangs on a fault nobody serves nor reads zeros in place
   of its data (it also keeps its own copy of the userfaultfd open, so the kernel never falls
   back to zero-filling its faults);
2. maps the memfd ``MAP_SHARED`` and closes the descriptor (a large-page VM, argument
   ``large``: at a 2 MiB-aligned address, plus a read-only unregistered mapping from which it
   collapses shmem THPs with ``MADV_COLLAPSE``, and it registers no minor faults, so that it
   maps each THP with one PMD);
3. creates a userfaultfd, registers its memory (missing faults, and minor and write-protect
   faults where the kernel offers them on shmem) and sends the descriptor and its layout to
   memvisor over the socket, as Firecracker's VMM does to its page-fault handler;
4. runs the batches memvisor sends: real numpy loads and stores over the mapping. A load or
   store of a page memvisor has not resolved blocks in the kernel until memvisor resolves it.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import sys

import numpy as np

from memvisor_backend_linux import protocol
from memvisor_backend_linux._native import load

PAGE = 4096

# uapi <linux/userfaultfd.h>
FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
FEATURE_MISSING_SHMEM = 1 << 5
FEATURE_MINOR_SHMEM = 1 << 10
FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
FEATURE_WP_ASYNC = 1 << 15
MODE_MISSING = 1
MODE_WP = 2
MODE_MINOR = 4
O_CLOEXEC = 0o2000000
O_NONBLOCK = 0o4000
UFFD_USER_MODE_ONLY = 1
PROT_READ, PROT_WRITE = 1, 2
MADV_DONTNEED, MADV_HUGEPAGE, MADV_COLLAPSE = 4, 14, 25
LARGE = 512 * PAGE

WANTED = FEATURE_MISSING_SHMEM | FEATURE_MINOR_SHMEM | FEATURE_PAGEFAULT_FLAG_WP | FEATURE_WP_HUGETLBFS_SHMEM


def open_uffd(lib, ffi, features: int) -> tuple[int, int]:
    """A userfaultfd with the wanted features the kernel offers: (fd, features). With
    ``FEATURE_WP_ASYNC`` the kernel resolves write-protect faults itself and records the write
    (dirty bits through PAGEMAP_SCAN) instead of delivering them."""
    flags = O_CLOEXEC | O_NONBLOCK
    fd = lib.mv_uffd_open(flags | UFFD_USER_MODE_ONLY)
    if fd < 0:
        fd = lib.mv_uffd_open(flags)
    if fd < 0:
        raise OSError(-fd, f"userfaultfd: {os.strerror(-fd)}")
    got, ioctls = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    rc = lib.mv_uffd_api(fd, features, got, ioctls)
    if rc == -22 and features:  # EINVAL: some feature is not offered; probe, then ask again
        os.close(fd)
        probe = lib.mv_uffd_open(flags)
        lib.mv_uffd_api(probe, 0, got, ioctls)
        offered = got[0]
        os.close(probe)
        return open_uffd(lib, ffi, features & offered)
    if rc < 0:
        os.close(fd)
        raise OSError(-rc, f"UFFDIO_API: {os.strerror(-rc)}")
    return fd, int(got[0])


def main(argv: list[str]) -> int:
    sock_fd, mem_fd, pages, parent = (int(a) for a in argv[1:5])
    dirty_tracking = len(argv) > 5 and argv[5] == "dirty"
    large = len(argv) > 6 and argv[6] == "large"
    native = load()
    lib, ffi = native.lib, native.ffi
    if lib.mv_die_with_parent(parent) != 0:
        return 3
    size = pages * PAGE
    collapser = 0
    if large:
        # Large pages: the memory at a 2 MiB-aligned address (the kernel then maps a shmem THP
        # with one PMD), and a second, unregistered mapping from which MADV_COLLAPSE works.
        addr = lib.mv_map_aligned(mem_fd, size, PROT_READ | PROT_WRITE)
        collapser = lib.mv_map_aligned(mem_fd, size, PROT_READ)
        if addr < 0 or collapser < 0:
            return 5
        lib.mv_madvise(addr, size, MADV_HUGEPAGE)
        lib.mv_madvise(collapser, size, MADV_HUGEPAGE)
        mem = ffi.buffer(ffi.cast("uint8_t *", addr), size)
    else:
        mem = mmap.mmap(mem_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(mem_fd)
    data = np.frombuffer(mem, dtype=np.uint8).reshape(pages, PAGE)
    words = data.view(np.uint64)
    base = data.ctypes.data
    sock = socket.socket(fileno=sock_fd)

    uffd, features = open_uffd(lib, ffi, WANTED | (FEATURE_WP_ASYNC if dirty_tracking else 0))
    if not features & FEATURE_MISSING_SHMEM:
        protocol.send(sock, protocol.ERROR, 0, 0, b"userfaultfd: no missing faults on shmem")
        return 4
    mode = MODE_MISSING
    if features & FEATURE_MINOR_SHMEM and not large:  # a minor fault's UFFDIO_CONTINUE maps 4 KiB
        mode |= MODE_MINOR
    if features & FEATURE_PAGEFAULT_FLAG_WP and features & FEATURE_WP_HUGETLBFS_SHMEM:
        mode |= MODE_WP
    ioctls = ffi.new("uint64_t *")
    rc = lib.mv_uffd_register(uffd, base, size, mode, ioctls)
    if rc < 0 and mode != MODE_MISSING:
        mode = MODE_MISSING
        rc = lib.mv_uffd_register(uffd, base, size, mode, ioctls)
    if rc < 0:
        protocol.send(sock, protocol.ERROR, 0, 0, f"UFFDIO_REGISTER: {os.strerror(-rc)}".encode())
        return 4
    layout = {"base": base, "pages": pages, "pid": os.getpid(), "features": features, "modes": mode,
              "ioctls": int(ioctls[0])}
    body = json.dumps(layout).encode()
    socket.send_fds(sock, [protocol.HEADER.pack(protocol.OK, 0, 0, 0, len(body)) + body], [uffd])
    # The guest keeps its copy of the uffd: were memvisor's copy the last, its death would
    # unregister the memory and turn every later fault into a zero page.

    while True:
        try:
            op, _, n, arg, payload = protocol.recv(sock)
        except protocol.GuestGone:
            return 0
        try:
            if op == protocol.EXIT:
                protocol.send(sock, protocol.OK)
                return 0
            gpps = np.frombuffer(payload, dtype=np.int64, count=n)
            if op == protocol.ACCESS:
                writes = np.frombuffer(payload, dtype=np.bool_, count=n, offset=8 * n)
                words[gpps, 0].sum()  # the loads, in program order
                written = gpps[writes]
                if len(written):
                    words[written, 0] = np.uint64(arg)  # the stores
                protocol.send(sock, protocol.OK)
            elif op == protocol.WRITE_PAGES:
                data[gpps] = np.frombuffer(payload, dtype=np.uint8, offset=8 * n).reshape(n, PAGE)
                protocol.send(sock, protocol.OK)
            elif op == protocol.READ_PAGES:
                protocol.send(sock, protocol.OK, n, 0, data[gpps])
            elif op == protocol.ZAP:
                for start, length in _runs(gpps):
                    lib.mv_madvise(base + start * PAGE, length * PAGE, MADV_DONTNEED)
                protocol.send(sock, protocol.OK)
            elif op == protocol.COLLAPSE:
                results = np.zeros(n, dtype=np.int64)
                for i, index in enumerate(gpps):
                    offset = int(index) * LARGE
                    # EINVAL where the guest has no collapsing mapping (not a large-page VM)
                    results[i] = lib.mv_madvise(collapser + offset, LARGE, MADV_COLLAPSE) if collapser else -22
                    if results[i] == 0:  # drop the 4 KiB PTEs: the next touch maps the PMD
                        lib.mv_madvise(base + offset, LARGE, MADV_DONTNEED)
                protocol.send(sock, protocol.OK, n, 0, results)
            elif op == protocol.TOUCH_TIMED:
                ns = np.zeros(n, dtype=np.int64)
                order = np.ascontiguousarray(gpps)
                lib.mv_touch_timed(ffi.cast("uint8_t *", base), ffi.cast("int64_t *", order.ctypes.data), n,
                                   ffi.cast("int64_t *", ns.ctypes.data))
                protocol.send(sock, protocol.OK, n, 0, ns)
            elif op == protocol.PING:
                protocol.send(sock, protocol.OK, 0, os.getpid())
            else:
                protocol.send(sock, protocol.ERROR, 0, 0, f"unknown operation {op}".encode())
        except protocol.GuestGone:
            return 0
        except Exception as exc:  # report, keep serving: memvisor decides what to do
            protocol.send(sock, protocol.ERROR, 0, 0, f"{type(exc).__name__}: {exc}".encode())


def _runs(gpps: np.ndarray):
    """(first page, length) of each run of consecutive pages in sorted ``gpps``."""
    if not len(gpps):
        return
    pages = np.unique(gpps)
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    for run in np.split(pages, breaks):
        yield int(run[0]), len(run)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
