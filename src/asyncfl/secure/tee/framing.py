"""Length-prefixed frames over a stream socket: the only thing that crosses the process boundary.

``frame = LEN(u32, big-endian) | payload``; a zero-length frame asks the peer to stop.
"""

from __future__ import annotations

import socket
import struct

from asyncfl.errors import ProtocolError

__all__ = ["MAX_FRAME", "recv_frame", "send_frame"]

MAX_FRAME = 1 << 31


def send_frame(sock: socket.socket, payload: bytes) -> None:
    # Two sends rather than one concatenation: a release frame is model-sized.
    sock.sendall(struct.pack(">I", len(payload)))
    sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError(f"peer closed the connection after {got} of {n} bytes")
        got += k
    return bytes(buf)


def recv_frame(sock: socket.socket) -> bytes:
    (n,) = struct.unpack(">I", _recv_exact(sock, 4))
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
    return _recv_exact(sock, n)
