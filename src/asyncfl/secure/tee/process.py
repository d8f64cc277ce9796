"""Entry point of the enclave process: ``main([package_dir, FD])``.

:class:`~asyncfl.secure.tee.backends.SubprocessBackend` starts it; ``FD`` is this process's
end of a socketpair. The first frame boots the enclave
(``config bytes`` and the simulated vendor key, each length-prefixed); every later frame is
one request, answered by one response frame; an empty frame or a closed socket ends it.
"""

from __future__ import annotations

import socket
import sys

from asyncfl.secure.tee.attestation import SimulatedVendor
from asyncfl.secure.tee.enclave import EnclaveConfig, SecureBufferEnclave
from asyncfl.secure.tee.framing import recv_frame, send_frame
from asyncfl.secure.tee.messages import ReportResponse, encode


def serve(sock: socket.socket) -> None:
    config, vendor_key = recv_frame(sock), recv_frame(sock)
    enclave = SecureBufferEnclave(
        EnclaveConfig.decode(config), SimulatedVendor.from_private(vendor_key)
    )
    send_frame(sock, encode(ReportResponse(enclave.report)))  # boot acknowledgement
    while True:
        try:
            data = recv_frame(sock)
        except EOFError:
            return
        if not data:
            return
        send_frame(sock, enclave.handle(data))


def main(argv: list[str]) -> int:
    with socket.socket(fileno=int(argv[-1])) as sock:
        serve(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
