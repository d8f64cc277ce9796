"""Length-prefixed frames over a stream socket: the only thing that crosses the process boundary.

``frame = LEN(u32, big-endian) | payload``; a zero-length frame asks the peer to stop.

Large frames (a release carries a model-sized vector) are neither joined nor copied on their
way out (:func:`send_parts` hands the vector's memory to the kernel) and are received into a
reusable buffer (:class:`FrameReader`), whose decoded messages copy out what they keep.
Frames sent back to back (pipelined registrations, their answers) share system calls.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Sequence

from asyncfl.errors import ProtocolError

__all__ = ["MAX_FRAME", "FrameReader", "send_frame", "send_frames", "send_parts", "tune_socket"]

MAX_FRAME = 1 << 31
# Parts smaller than this are coalesced with the length prefix into one send (one syscall per
# small frame); larger ones are sent from their own memory.
_COALESCE = 1 << 16
_SOCKET_BUFFER = 1 << 22


def tune_socket(sock: socket.socket) -> None:
    """Ask for 4 MiB socket buffers (the kernel caps them at its maximum): a model-sized
    release then crosses in a few large copies instead of hundreds of 200 KiB ones."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        # A platform without the option keeps its defaults: slower, still correct.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)


def _frame_parts(parts: Sequence[bytes | memoryview], out: list[bytes | memoryview]) -> None:
    total = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    if total > MAX_FRAME:
        raise ProtocolError(f"frame of {total} bytes exceeds the {MAX_FRAME}-byte limit")
    out.append(struct.pack(">I", total))
    out.extend(parts)


def _send(sock: socket.socket, pieces: list[bytes | memoryview]) -> None:
    """Send ``pieces`` in order: small ones coalesced, large ones from their own memory."""
    pending: list[bytes | memoryview] = []
    for piece in pieces:
        if (len(piece) if isinstance(piece, bytes) else piece.nbytes) >= _COALESCE:
            if pending:
                sock.sendall(b"".join(pending))
                pending = []
            sock.sendall(piece)
        else:
            pending.append(piece)
    if pending:
        sock.sendall(b"".join(pending))


def send_parts(sock: socket.socket, parts: Sequence[bytes | memoryview]) -> None:
    """Send one frame whose payload is the concatenation of ``parts``."""
    send_frames(sock, [parts])


def send_frames(sock: socket.socket, frames: Sequence[Sequence[bytes | memoryview]]) -> None:
    """Send several frames (each given as its parts) with as few system calls as possible."""
    pieces: list[bytes | memoryview] = []
    for parts in frames:
        _frame_parts(parts, pieces)
    _send(sock, pieces)


def send_frame(sock: socket.socket, payload: bytes) -> None:
    send_parts(sock, (payload,))


class FrameReader:
    """Reads frames from one connection through a buffer: a ``recv`` takes whatever has
    arrived, so frames sent back to back cost one system call, not two each.

    A returned frame is a view into the buffer, valid until the next :meth:`read`. Use one
    reader per connection for its whole life (it may hold bytes of the next frames).
    """

    def __init__(self, size: int = 1 << 16) -> None:
        self._buf = bytearray(size)
        self._start = 0  # first unread byte
        self._end = 0  # end of the received bytes

    def _need(self) -> int:
        """Bytes the next frame needs in total (header included), or 4 if its header is
        incomplete; raises on a frame over the limit."""
        if self._end - self._start < 4:
            return 4
        (n,) = struct.unpack_from(">I", self._buf, self._start)
        if n > MAX_FRAME:
            raise ProtocolError(f"frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
        return 4 + int(n)

    def has_frame(self) -> bool:
        """Whether a whole frame is already buffered (:meth:`read` then makes no system call)."""
        return self._end - self._start >= self._need()

    def read(self, sock: socket.socket) -> memoryview:
        """The next frame's payload; blocks until it has arrived whole."""
        while True:
            need = self._need()
            if self._end - self._start >= need:
                view = memoryview(self._buf)[self._start + 4 : self._start + need]
                self._start += need
                return view
            if self._start == self._end:
                self._start = self._end = 0
            if len(self._buf) - self._start < need:
                # Move the partial frame to the front of a buffer large enough for it. A new
                # bytearray when growing: views handed out earlier stay valid on the old one.
                held = bytes(memoryview(self._buf)[self._start : self._end])
                if len(self._buf) < need:
                    self._buf = bytearray(max(need, 2 * len(self._buf)))
                self._buf[: len(held)] = held
                self._start, self._end = 0, len(held)
            got = sock.recv_into(memoryview(self._buf)[self._end :])
            if got == 0:
                raise EOFError(
                    f"peer closed the connection with {self._end - self._start} bytes of an "
                    f"incomplete frame buffered"
                )
            self._end += got
