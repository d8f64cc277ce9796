"""Entry point of the enclave process: ``main([package_dir, FD])``.

:class:`~asyncfl.secure.tee.backends.SubprocessBackend` starts it; ``FD`` is this process's
end of a socketpair. The first frame boots the enclave
(``config bytes``, the simulated vendor key and an optional 8-byte seed of research-mode DP
noise, each length-prefixed); every later frame is one request, answered by one response
frame; an empty frame or a closed socket ends it. The deferred mask work of a registration
runs after its answer is sent, while the aggregator does its own part of the arrival.
"""

from __future__ import annotations

import socket
import sys
from typing import TYPE_CHECKING

from asyncfl.secure.tee.attestation import SimulatedVendor
from asyncfl.secure.tee.enclave import EnclaveConfig, SecureBufferEnclave
from asyncfl.secure.tee.framing import recv_frame, send_frame
from asyncfl.secure.tee.messages import ReportResponse, encode

if TYPE_CHECKING:
    from asyncfl.privacy.noise import NoiseSource


def serve(sock: socket.socket) -> None:
    config, vendor_key, noise_seed = recv_frame(sock), recv_frame(sock), recv_frame(sock)
    noise: NoiseSource | None = None
    if noise_seed:
        # Imported only in research mode: the privacy package is not in the enclave's usual
        # trusted computing base (SecureNoise is imported by the enclave when it adds noise).
        from asyncfl.privacy.noise import SeededNoise

        noise = SeededNoise(int.from_bytes(noise_seed, "big"))
    enclave = SecureBufferEnclave(
        EnclaveConfig.decode(config), SimulatedVendor.from_private(vendor_key), noise=noise
    )
    send_frame(sock, encode(ReportResponse(enclave.report)))  # boot acknowledgement
    while True:
        try:
            data = recv_frame(sock)
        except EOFError:
            return
        if not data:
            return
        send_frame(sock, enclave.respond(data))
        enclave.complete()


def main(argv: list[str]) -> int:
    with socket.socket(fileno=int(argv[-1])) as sock:
        serve(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
