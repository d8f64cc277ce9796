"""Where the enclave program runs: the narrow interface a real TEE backend plugs into.

:class:`EnclaveBackend` is all the aggregator knows: send a request, get a response, restart.
Every request and response is encoded to bytes (:mod:`asyncfl.secure.tee.messages`) even in
process, so the encoding is always exercised and a backend for SGX/SEV/TDX only has to move
the same frames into its enclave (an ECALL, a vsock, a shared-memory ring).

- :class:`InProcessBackend`: the enclave object in this process (unit tests, simulation).
- :class:`SubprocessBackend`: the enclave in its own OS process behind a socketpair,
  modelling the isolation boundary: only length-prefixed byte frames cross it, never pickled
  objects (a fresh interpreter, so no parent state is inherited either), plus, where the OS
  has ``memfd_create``, a shared output region the enclave writes each release into and the
  host maps read-only (as a TDX/SEV guest shares pages with its host), so a model-sized
  release is not copied through the socket. If the process dies, the next call boots a
  fresh one, which, like a restarted TEE, has a new key and epoch and an empty buffer.

:meth:`EnclaveBackend.call_overlapped` lets the aggregator do its share of an arrival while
the enclave works on the request: the subprocess backend sends the frame, runs the
aggregator's work, then reads the answer, so on two cores the two halves run at once (the
enclave also defers its mask expansion until after it has answered, see
:meth:`SecureBufferEnclave.respond`). :meth:`EnclaveBackend.submit` and
:meth:`EnclaveBackend.receive` go further: several requests may be in flight, their answers
come back in order, and the caller reads them when it needs them (a pipelined aggregator waits
only before a release).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import socket
import struct
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from asyncfl.errors import ProtocolError
from asyncfl.secure.ring import Ring, RingVector
from asyncfl.secure.tee.attestation import SimulatedVendor
from asyncfl.secure.tee.enclave import EnclaveConfig, SecureBufferEnclave
from asyncfl.secure.tee.framing import FrameReader, send_frame, send_parts, tune_socket
from asyncfl.secure.tee.messages import (
    ReportResponse,
    Request,
    Response,
    decode,
    encode,
    encode_parts,
)

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

    def submit(self, request: Request) -> None:
        """Deliver ``request`` without waiting; its answer comes from a later :meth:`receive`."""
        ...

    def receive(self, wait: bool = True) -> Response | None:
        """The answer to the oldest submitted request not yet received, in submission order;
        ``None`` when nothing is outstanding, or (``wait=False``) when it has not arrived."""
        ...

    @property
    def outstanding(self) -> int:
        """Submitted requests whose answers have not been received; :meth:`call` needs 0."""
        ...

    def restart(self) -> None:
        """Stop the enclave and boot a fresh one (new key, new epoch, empty buffer).

        Requests still outstanding are delivered again to the new boot, which refuses the
        old-epoch ones: their answers say that the buffer is gone.
        """
        ...

    def close(self) -> None: ...


def _as_response(data: bytes | memoryview, shared: RingVector | None = None) -> Response:
    msg = decode(data, shared)
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
        self.restarts = 0
        self._boot()
        # One thread: a submitted request is answered at once; the answers wait here.
        self._answers: deque[Response] = deque()

    def _boot(self) -> None:
        # The output region, as in the subprocess backend: the enclave writes each release
        # there, and the host reads it through a read-only view instead of a copied frame.
        region = Ring(self._config.ring_bits).zeros(self._config.dim)
        self.enclave = SecureBufferEnclave(
            self._config, self._vendor, noise=self._noise, shared_out=region
        )
        self._shared = region.view()
        self._shared.flags.writeable = False

    def call(self, request: Request) -> Response:
        _check_idle(self)
        return _as_response(self.enclave.handle(encode(request)), self._shared)

    def call_overlapped(self, request: Request, work: Callable[[], None]) -> Response:
        # One thread: nothing to overlap; the enclave answers first, then the work runs.
        resp = self.call(request)
        work()
        return resp

    def submit(self, request: Request) -> None:
        self._answers.append(_as_response(self.enclave.handle(encode(request)), self._shared))

    def receive(self, wait: bool = True) -> Response | None:
        return self._answers.popleft() if self._answers else None

    @property
    def outstanding(self) -> int:
        return len(self._answers)

    def restart(self) -> None:
        # Outstanding requests were answered by the old boot already; those answers stand.
        self._boot()
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
        self._dim = config.dim
        self._dtype = Ring(config.ring_bits).dtype
        self._shared: RingVector | None = None
        self._vendor_key = vendor.private
        self._noise_seed = b"" if noise_seed is None else noise_seed.to_bytes(8, "big")
        self._timeout = timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._poller = select.poll()
        self._reader = FrameReader()
        # Frames submitted and not yet answered, oldest first: delivered again to a new boot.
        self._unanswered: deque[list[bytes | memoryview]] = deque()
        self._broken = False  # the connection failed; the next receive restarts the enclave
        self.restarts = 0
        self._boot()

    def _boot(self) -> None:
        ours, theirs = socket.socketpair()
        region = _shared_region(self._dim * self._dtype.itemsize)
        fds = (theirs.fileno(),) if region is None else (theirs.fileno(), region)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, _PACKAGE_DIR, str(theirs.fileno())],
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
            )
            self._shared = None
            if region is not None:
                # Read-only here: the host can read what the enclave releases, never write it.
                view = mmap.mmap(region, self._dim * self._dtype.itemsize, prot=mmap.PROT_READ)
                self._shared = np.frombuffer(view, dtype=self._dtype)
        finally:
            theirs.close()
            if region is not None:
                os.close(region)
        ours.settimeout(self._timeout)
        tune_socket(ours)
        self._sock = ours
        self._reader = FrameReader()  # nothing buffered from a previous connection
        self._poller = select.poll()
        self._poller.register(ours, select.POLLIN)
        send_frame(ours, self._config)
        send_frame(ours, self._vendor_key)
        send_frame(ours, self._noise_seed)
        send_frame(ours, b"" if region is None else struct.pack(">I", region))
        try:
            ack = _as_response(self._reader.read(ours))
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
        _check_idle(self)
        self.submit(request)
        work()  # the enclave process handles the frame meanwhile
        resp = self.receive()
        assert resp is not None
        return resp

    def submit(self, request: Request) -> None:
        frame = encode_parts(request)
        self._unanswered.append(frame)
        if not self._broken:
            self._send(frame)

    def _send(self, frame: list[bytes | memoryview]) -> None:
        assert self._sock is not None
        try:
            send_parts(self._sock, frame)
        except TimeoutError as exc:
            raise ProtocolError(f"enclave did not accept a frame within {self._timeout} s") from exc
        except OSError:
            self._broken = True  # dead process: the next receive boots a fresh one

    def receive(self, wait: bool = True) -> Response | None:
        if not self._unanswered:
            return None
        if not self._broken:
            assert self._sock is not None
            if not wait and not self._reader.has_frame() and not self._poller.poll(0):
                return None
            try:
                resp = _as_response(self._reader.read(self._sock), self._shared)
            except TimeoutError as exc:
                raise ProtocolError(f"enclave did not answer within {self._timeout} s") from exc
            except (EOFError, OSError):
                self._broken = True
            else:
                self._unanswered.popleft()
                return resp
        # The enclave process died: boot a fresh one (empty buffer, new epoch), which gets the
        # unanswered requests once more; the old-epoch ones are refused.
        self.restart()
        assert self._sock is not None
        try:
            resp = _as_response(self._reader.read(self._sock), self._shared)
        except TimeoutError as exc:
            raise ProtocolError(f"enclave did not answer within {self._timeout} s") from exc
        except (EOFError, OSError) as exc:
            raise ProtocolError(f"enclave process unreachable: {exc}") from exc
        self._unanswered.popleft()
        return resp

    @property
    def outstanding(self) -> int:
        return len(self._unanswered)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def restart(self) -> None:
        self._stop()
        self._boot()
        self._broken = False
        self.restarts += 1
        for frame in self._unanswered:
            self._send(frame)

    def close(self) -> None:
        self._stop()

    def __del__(self) -> None:
        # Best effort at interpreter shutdown, when modules may already be torn down.
        with contextlib.suppress(Exception):
            self._stop()


def _nothing() -> None:
    pass


def _shared_region(nbytes: int) -> int | None:
    """A file descriptor of ``nbytes`` of shareable memory, or None where there is none
    (releases then travel in the frame)."""
    create = getattr(os, "memfd_create", None)
    if create is None:  # pragma: no cover - not Linux
        return None
    try:
        fd = int(create("asyncfl-enclave-release", os.MFD_CLOEXEC))
    except OSError:  # pragma: no cover - a kernel without memfd
        return None
    try:
        os.ftruncate(fd, nbytes)
    except OSError:  # pragma: no cover
        os.close(fd)
        return None
    return fd


def _check_idle(backend: EnclaveBackend) -> None:
    if backend.outstanding:
        raise ProtocolError(
            f"{backend.outstanding} submitted request(s) still unanswered: receive() them "
            "before call()"
        )
