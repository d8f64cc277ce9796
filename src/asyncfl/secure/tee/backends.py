"""Where the enclave program runs: the narrow interface a real TEE backend plugs into.

:class:`EnclaveBackend` is all the aggregator knows: send a request, get a response, restart.
Every request and response is encoded to bytes (:mod:`asyncfl.secure.tee.messages`) even in
process, so the encoding is always exercised and a backend for SGX/SEV/TDX only has to move
the same frames into its enclave (an ECALL, a vsock, a shared-memory ring).

- :class:`InProcessBackend`: the enclave object in this process (unit tests, simulation).
- :class:`SubprocessBackend`: the enclave in its own OS process behind a socketpair,
  modelling the isolation boundary: only length-prefixed byte frames cross it, never pickled
  objects (a fresh interpreter, so no parent state is inherited either). If the process
  dies, the next call boots a fresh one, which, like a restarted TEE, has a new key and
  epoch and an empty buffer.

:meth:`EnclaveBackend.call_overlapped` lets the aggregator do its share of an arrival while
the enclave works on the request: the subprocess backend sends the frame, runs the
aggregator's work, then reads the answer, so on two cores the two halves run at once (the
enclave also defers its mask expansion until after it has answered, see
:meth:`SecureBufferEnclave.respond`).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from asyncfl.errors import ProtocolError
from asyncfl.secure.tee.attestation import SimulatedVendor
from asyncfl.secure.tee.enclave import EnclaveConfig, SecureBufferEnclave
from asyncfl.secure.tee.framing import recv_frame, send_frame
from asyncfl.secure.tee.messages import ReportResponse, Request, Response, decode, encode

if TYPE_CHECKING:
    from asyncfl.privacy.noise import NoiseSource

__all__ = ["EnclaveBackend", "InProcessBackend", "SubprocessBackend"]


class EnclaveBackend(Protocol):
    """A running secure-buffer enclave, seen from the untrusted host."""

    def call(self, request: Request) -> Response:
        """Deliver one request and return the enclave's answer."""
        ...

    def call_overlapped(self, request: Request, work: Callable[[], None]) -> Response:
        """Like :meth:`call`, running ``work()`` (exactly once) while the enclave computes.

        ``work`` must not depend on the answer; the caller undoes it if the answer is a
        refusal.
        """
        ...

    def restart(self) -> None:
        """Stop the enclave and boot a fresh one (new key, new epoch, empty buffer)."""
        ...

    def close(self) -> None: ...


def _as_response(data: bytes) -> Response:
    msg = decode(data)
    if isinstance(msg, Request):
        raise ProtocolError(f"enclave answered with a request ({type(msg).__name__})")
    return msg


class InProcessBackend:
    """The enclave as an object in this process; frames are still encoded and decoded."""

    def __init__(
        self,
        config: EnclaveConfig,
        vendor: SimulatedVendor,
        *,
        noise: NoiseSource | None = None,
    ) -> None:
        self._config = config
        self._vendor = vendor
        self._noise = noise
        self.enclave = SecureBufferEnclave(config, vendor, noise=noise)
        self.restarts = 0

    def call(self, request: Request) -> Response:
        return _as_response(self.enclave.handle(encode(request)))

    def call_overlapped(self, request: Request, work: Callable[[], None]) -> Response:
        # One thread: nothing to overlap; the enclave answers first, then the work runs.
        resp = self.call(request)
        work()
        return resp

    def restart(self) -> None:
        self.enclave = SecureBufferEnclave(self._config, self._vendor, noise=self._noise)
        self.restarts += 1

    def close(self) -> None:
        pass


# The enclave process loads only the enclave's modules (a small trusted computing base, and a
# fast boot): the package's __init__ re-exports the simulator and imports torch, and the
# privacy package's imports the accountants (dp_accounting, scipy: seconds), of which the
# enclave needs only the noise module. So the child registers bare ``asyncfl`` and
# ``asyncfl.privacy`` packages (their paths, no __init__ code) before importing.
_PACKAGE_DIR = str(Path(__file__).resolve().parents[2])
_BOOTSTRAP = (
    "import sys, types\n"
    "for name, path in (('asyncfl', sys.argv[1]), ('asyncfl.privacy', sys.argv[1] + '/privacy')):\n"
    "    pkg = types.ModuleType(name)\n"
    "    pkg.__path__ = [path]\n"
    "    sys.modules[name] = pkg\n"
    "from asyncfl.secure.tee.process import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


class SubprocessBackend:
    """The enclave in a separate interpreter running :mod:`asyncfl.secure.tee.process`.

    Parent and child share only a socketpair carrying length-prefixed frames. The vendor key
    is handed to the child at boot because it plays the CPU's quoting key; the parent never
    sees the enclave's private key or its mask accumulator. ``noise_seed`` (research only, no
    formal DP guarantee) makes the enclave's DP noise reproducible; ``None`` draws it from the
    child's OS CSPRNG.
    """

    def __init__(
        self,
        config: EnclaveConfig,
        vendor: SimulatedVendor,
        timeout_s: float = 60.0,
        *,
        noise_seed: int | None = None,
    ) -> None:
        if noise_seed is not None and not 0 <= noise_seed < 1 << 64:
            raise ValueError(f"noise_seed={noise_seed} must be in [0, 2^64) or None")
        self._config = config.encode()
        self._vendor_key = vendor.private
        self._noise_seed = b"" if noise_seed is None else noise_seed.to_bytes(8, "big")
        self._timeout = timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self.restarts = 0
        self._boot()

    def _boot(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, _PACKAGE_DIR, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        ours.settimeout(self._timeout)
        self._sock = ours
        send_frame(ours, self._config)
        send_frame(ours, self._vendor_key)
        send_frame(ours, self._noise_seed)
        try:
            ack = _as_response(recv_frame(ours))
        except (EOFError, OSError) as exc:
            self._stop()
            raise ProtocolError(f"enclave process failed to boot: {exc}") from exc
        if not isinstance(ack, ReportResponse):
            self._stop()
            raise ProtocolError(f"enclave process booted with {type(ack).__name__}")

    def _stop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                send_frame(self._sock, b"")
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def call(self, request: Request) -> Response:
        return self.call_overlapped(request, _nothing)

    def call_overlapped(self, request: Request, work: Callable[[], None]) -> Response:
        frame = encode(request)
        assert self._sock is not None
        try:
            send_frame(self._sock, frame)
            sent = True
        except TimeoutError as exc:
            raise ProtocolError(f"enclave did not accept a frame within {self._timeout} s") from exc
        except OSError:
            sent = False
        work()  # the enclave process handles the frame meanwhile
        if sent:
            try:
                return _as_response(recv_frame(self._sock))
            except TimeoutError as exc:
                raise ProtocolError(f"enclave did not answer within {self._timeout} s") from exc
            except (EOFError, OSError):
                pass
        # The enclave process died: boot a fresh one (empty buffer, new epoch) and deliver
        # the request to it once; an old-epoch request will be refused.
        self.restart()
        assert self._sock is not None
        try:
            send_frame(self._sock, frame)
            return _as_response(recv_frame(self._sock))
        except TimeoutError as exc:
            raise ProtocolError(f"enclave did not answer within {self._timeout} s") from exc
        except (EOFError, OSError) as exc:
            raise ProtocolError(f"enclave process unreachable: {exc}") from exc

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def restart(self) -> None:
        self._stop()
        self._boot()
        self.restarts += 1

    def close(self) -> None:
        self._stop()

    def __del__(self) -> None:
        # Best effort at interpreter shutdown, when modules may already be torn down.
        with contextlib.suppress(Exception):
            self._stop()


def _nothing() -> None:
    pass
