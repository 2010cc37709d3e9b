"""The messages between memvisor and a guest process over their Unix stream socket.

A message is a 32-byte header (operation, status, count, argument, payload length; little
endian) followed by the payload. Page numbers travel as int64, write masks as uint8, page
contents as raw 4 KiB rows. The first message, from the guest, carries its userfaultfd
(SCM_RIGHTS) and its memory layout as JSON.
"""

from __future__ import annotations

import socket
import struct

HEADER = struct.Struct("<IIQQQ")

ACCESS = 1  # n accesses: int64 pages then uint8 writes; arg = the stamp
WRITE_PAGES = 2  # n pages: int64 pages then n * 4096 bytes
READ_PAGES = 3  # n pages: int64 pages; reply: n * 4096 bytes
ZAP = 4  # n pages: int64 pages; MADV_DONTNEED over their runs (page-cache pages stay)
TOUCH_TIMED = 5  # n pages: int64 pages; reply: int64 ns per touch (benchmarks)
EXIT = 6
PING = 7
COLLAPSE = 8  # n large pages: int64 indices; MADV_COLLAPSE each, then drop the guest's PTEs; reply: n int64 results

OK = 100
ERROR = 101


class GuestGone(Exception):
    """The guest's end of the socket closed: the guest process died."""


def send(sock: socket.socket, op: int, n: int = 0, arg: int = 0, *payloads, status: int = 0) -> None:
    """Send one message; payloads are bytes-like objects sent one after the other."""
    views = [memoryview(p).cast("B") for p in payloads]
    sock.sendall(HEADER.pack(op, status, n, arg, sum(len(v) for v in views)))
    for view in views:
        sock.sendall(view)


def _recv_exact(sock: socket.socket, size: int) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise GuestGone("the other end closed the socket")
        got += n
    return buf


def recv(sock: socket.socket) -> tuple[int, int, int, int, bytearray]:
    """Receive one message: (op, status, n, arg, payload)."""
    op, status, n, arg, length = HEADER.unpack(_recv_exact(sock, HEADER.size))
    return op, status, n, arg, _recv_exact(sock, length) if length else bytearray()
