"""Entry point of the enclave process: ``main([package_dir, FD])``.

:class:`~asyncfl.secure.tee.backends.SubprocessBackend` starts it; ``FD`` is this process's
end of a socketpair. The first frames boot the enclave
(``config bytes``, the simulated vendor key, an optional 8-byte seed of research-mode DP
noise, and optionally the number of an inherited file descriptor of the shared output region,
as a 4-byte integer: see :mod:`~asyncfl.secure.tee.messages`); every later frame is one
request, answered by one response frame; an empty frame or a closed socket ends it.

Scheduling: requests come first. The deferred mask work of answered registrations
(:meth:`~asyncfl.secure.tee.enclave.SecureBufferEnclave.work`) runs one chunk at a time
while no request is waiting, so a registration is answered within about one chunk's time
(~0.15-0.3 ms at most) even when many masks are queued, and the masks are expanded on this
process's own core while the aggregator adds the masked uploads on its. Requests that arrived
together are answered with one send. A release completes the queue before it answers.
"""

from __future__ import annotations

import mmap
import select
import socket
import struct
import sys
from typing import TYPE_CHECKING

import numpy as np

from asyncfl.secure.ring import Ring
from asyncfl.secure.tee.attestation import SimulatedVendor
from asyncfl.secure.tee.enclave import EnclaveConfig, SecureBufferEnclave
from asyncfl.secure.tee.framing import FrameReader, send_frame, send_frames, tune_socket
from asyncfl.secure.tee.messages import ReportResponse, encode

if TYPE_CHECKING:
    from asyncfl.privacy.noise import NoiseSource


def serve(sock: socket.socket) -> None:
    tune_socket(sock)
    reader = FrameReader()
    config, vendor_key, noise_seed, shared_fd = (bytes(reader.read(sock)) for _ in range(4))
    cfg = EnclaveConfig.decode(config)
    shared = None
    if shared_fd:
        (fd,) = struct.unpack(">I", shared_fd)
        dtype = Ring(cfg.ring_bits).dtype
        with open(fd, "r+b", closefd=True) as f:  # the mapping outlives the descriptor
            region = mmap.mmap(f.fileno(), cfg.dim * dtype.itemsize)
        shared = np.frombuffer(region, dtype=dtype)
    noise: NoiseSource | None = None
    if noise_seed:
        # Imported only in research mode: the privacy package is not in the enclave's usual
        # trusted computing base (SecureNoise is imported by the enclave when it adds noise).
        from asyncfl.privacy.noise import SeededNoise

        noise = SeededNoise(int.from_bytes(noise_seed, "big"))
    enclave = SecureBufferEnclave(
        cfg, SimulatedVendor.from_private(vendor_key), noise=noise, shared_out=shared
    )
    send_frame(sock, encode(ReportResponse(enclave.report)))  # boot acknowledgement
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    answers: list[list[bytes | memoryview]] = []
    while True:
        # Queued mask work runs only while no request is waiting (poll with timeout 0: a
        # closed socket also counts as readable, and the read below then ends the loop).
        while enclave.has_work and not reader.has_frame() and not poller.poll(0):
            enclave.work()
        try:
            data = reader.read(sock)
        except EOFError:
            return
        if not data:
            return
        answer = enclave.respond_parts(data)
        answers.append(answer)
        # Answers to requests that arrived together leave together; a release's vector (a
        # view of the enclave's output buffer) is sent before any other request is handled.
        if not reader.has_frame() or any(isinstance(p, memoryview) for p in answer):
            send_frames(sock, answers)
            answers = []


def main(argv: list[str]) -> int:
    with socket.socket(fileno=int(argv[-1])) as sock:
        serve(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
