"""The secure buffer's fast path: chunked masks, the enclave's deferred work, pipelined
registrations (backends' submit/receive, SecureFedBuff(pipeline=...)) and zero-copy frames."""

from __future__ import annotations

import os
import signal
import socket
import threading
from dataclasses import replace

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from asyncfl.algorithms.fedbuff import FedBuff, FedBuffConfig
from asyncfl.algorithms.secure_fedbuff import SecureFedBuff
from asyncfl.core.server_opt import ServerOptimizerConfig, make_server_optimizer
from asyncfl.core.update import Update
from asyncfl.core.weights import StalenessConfig
from asyncfl.errors import ProtocolError
from asyncfl.secure import prg
from asyncfl.secure.fixedpoint import FixedPointCodec, Rounding
from asyncfl.secure.prg import MaskExpander
from asyncfl.secure.ring import Ring
from asyncfl.secure.tee import (
    EnclaveConfig,
    InProcessBackend,
    RefusalCode,
    SecureBufferEnclave,
    SimulatedVendor,
    SubprocessBackend,
    TeeClient,
    expected_measurement,
)
from asyncfl.secure.tee.backends import EnclaveBackend
from asyncfl.secure.tee.client import MaskedUpdate
from asyncfl.secure.tee.framing import (
    MAX_FRAME,
    FrameReader,
    send_frame,
    send_frames,
    send_parts,
)
from asyncfl.secure.tee.messages import (
    Discarded,
    DiscardRequest,
    Refused,
    Registered,
    RegisterRequest,
    Released,
    ReleaseRequest,
    ReportRequest,
    ReportResponse,
    Response,
    SealedSeed,
    decode,
    encode,
    encode_parts,
)
from asyncfl.secure.tee.sealing import SeedContext, seal_seed

DIM = 37
RING = 62
FRAC = 20
S = 10
K = 3


def _cfg(**kw: object) -> EnclaveConfig:
    base = EnclaveConfig("t1", DIM, RING, FRAC, 1.0, S, K, (1 << S) * 50)
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def vendor() -> SimulatedVendor:
    return SimulatedVendor.generate()


def _keystream(seed: bytes, n: int, width: int) -> np.ndarray:
    """Independent mask: the one-shot AES-256-CTR keystream (zero nonce), little-endian words."""
    raw = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(n * width))
    return np.frombuffer(raw, dtype=f"<u{width}")


@pytest.mark.parametrize("bits", [20, 32, 62])
def test_chunked_mask_equals_the_one_shot_keystream(bits: int) -> None:
    ring = Ring(bits)
    n = 2 * prg._CHUNK + 5  # three chunks, the last one short
    seed = bytes(range(3, 35))
    acc = ring.reduce(np.arange(n, dtype=ring.dtype) * ring.dtype.type(7919))
    start = [int(v) for v in acc]
    steps = MaskExpander(ring, n).accumulate_steps(acc, seed, scale=3 * 1024 + 5)
    assert sum(1 for _ in steps) == 2  # one next() per chunk; the last ends the iteration
    ring.reduce(acc)
    words = _keystream(seed, n, ring.dtype.itemsize)
    # Python integers at the chunk boundaries and ends: no wrap-around shortcuts.
    for i in (0, prg._CHUNK - 1, prg._CHUNK, 2 * prg._CHUNK - 1, 2 * prg._CHUNK, n - 1):
        assert int(acc[i]) == (start[i] + (3 * 1024 + 5) * int(words[i])) % (1 << bits), i
    ref = ring.reduce(
        np.arange(n, dtype=ring.dtype) * ring.dtype.type(7919)
        + words.astype(ring.dtype) * ring.dtype.type(3 * 1024 + 5)
    )
    np.testing.assert_array_equal(acc, ref)
    np.testing.assert_array_equal(
        MaskExpander(ring, n).expand(seed), ring.reduce(words.astype(ring.dtype))
    )
    # assign: whatever was in the accumulator is overwritten, chunk by chunk.
    for _ in MaskExpander(ring, n).accumulate_steps(acc, seed, scale=3, assign=True):
        pass
    np.testing.assert_array_equal(
        ring.reduce(acc), ring.reduce(words.astype(ring.dtype) * ring.dtype.type(3))
    )
    with pytest.raises(ValueError, match="negate"):
        MaskExpander(ring, n).accumulate_steps(acc, seed, negate=True, assign=True)
    with pytest.raises(ValueError, match="scale"):  # checked at the call, not at the 1st step
        MaskExpander(ring, n).accumulate_steps(acc, seed, scale=0)


def _seal(e: SecureBufferEnclave, seed: bytes, client: int) -> SealedSeed:
    return seal_seed(seed, SeedContext("t1", client, 0, os.urandom(16), e.report.public_key))


def _register(e: SecureBufferEnclave, seed: bytes, client: int, weight: int) -> bytes:
    sealed = _seal(e, seed, client)
    out = decode(e.respond(encode(RegisterRequest(e.report.epoch, client, 0, weight, sealed))))
    assert isinstance(out, Registered)
    return sealed.update_id


def _minus_weighted_masks(seeds: list[bytes], weights: list[int]) -> list[int]:
    masks = [_keystream(s, DIM, 8) for s in seeds]
    return [
        (-sum(w * int(m[i]) for w, m in zip(weights, masks, strict=True))) % (1 << RING)
        for i in range(DIM)
    ]


def test_enclave_defers_mask_work_and_interleaves_requests(
    vendor: SimulatedVendor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prg, "_CHUNK", 8)  # 37 elements: five chunks per mask
    e = SecureBufferEnclave(_cfg(), vendor)
    seeds = [os.urandom(32) for _ in range(5)]
    weights = [1024, 517, 2100, 3, 999]
    ids = [_register(e, seeds[0], 0, weights[0]), _register(e, seeds[1], 1, weights[1])]
    assert e.has_work  # answered, masks not yet added
    assert e.work() and e.work()  # two chunks of the first mask
    # A registration in the middle of a mask: answered at once, its mask queued behind.
    ids.append(_register(e, seeds[2], 2, weights[2]))
    out = decode(e.respond(encode(ReleaseRequest(e.report.epoch, tuple(ids)))))
    assert isinstance(out, Released) and not e.has_work
    assert out.unmask.tolist() == _minus_weighted_masks(seeds[:3], weights[:3])
    # A discard drops queued and half-added masks alike; the next buffer starts clean.
    ids = [_register(e, seeds[3], 3, weights[3])]
    assert e.work() and e.has_work
    out = decode(e.respond(encode(DiscardRequest(e.report.epoch))))
    assert isinstance(out, Discarded) and out.count == 1 and not e.has_work
    ids = [
        _register(e, s, 10 + i, w)
        for i, (s, w) in enumerate(zip(seeds[2:], weights[2:], strict=True))
    ]
    while e.work():
        pass
    out = decode(e.handle(encode(ReleaseRequest(e.report.epoch, tuple(ids)))))
    assert isinstance(out, Released)
    assert out.unmask.tolist() == _minus_weighted_masks(seeds[2:], weights[2:])


class _LateBackend(InProcessBackend):
    """An in-process enclave whose answers only ever arrive when the caller waits for them:
    the worst case of a pipelined aggregator, every refusal found late."""

    def receive(self, wait: bool = True) -> Response | None:
        return super().receive() if wait else None


def _backend(kind: str, ecfg: EnclaveConfig, vendor: SimulatedVendor) -> EnclaveBackend:
    if kind == "subprocess":
        return SubprocessBackend(ecfg, vendor)
    return _LateBackend(ecfg, vendor) if kind == "late" else InProcessBackend(ecfg, vendor)


@pytest.mark.parametrize("kind", ["inprocess", "subprocess"])
def test_backends_answer_submitted_requests_in_order(vendor: SimulatedVendor, kind: str) -> None:
    backend = _backend(kind, _cfg(), vendor)
    try:
        assert backend.receive() is None and backend.receive(wait=False) is None
        report = backend.call(ReportRequest())
        assert isinstance(report, ReportResponse)
        enclave_key, epoch = report.report.public_key, report.report.epoch
        sealed = [
            seal_seed(os.urandom(32), SeedContext("t1", c, 0, os.urandom(16), enclave_key))
            for c in range(3)
        ]
        backend.submit(RegisterRequest(epoch, 0, 0, 5, sealed[0]))
        backend.submit(RegisterRequest(epoch, 9, 0, 5, sealed[1]))  # seal names client 1
        backend.submit(RegisterRequest(epoch, 2, 0, 7, sealed[2]))
        assert backend.outstanding == 3
        with pytest.raises(ProtocolError, match="unanswered"):
            backend.call(ReportRequest())
        answers = [backend.receive() for _ in range(3)]
        assert isinstance(answers[0], Registered) and answers[0].count == 1
        assert isinstance(answers[1], Refused) and answers[1].code is RefusalCode.BAD_SEAL
        assert isinstance(answers[2], Registered) and answers[2].total_weight == 12
        assert backend.outstanding == 0 and backend.receive() is None
        assert isinstance(backend.call(DiscardRequest(epoch)), Discarded)
    finally:
        backend.close()


def test_subprocess_crash_with_requests_in_flight(vendor: SimulatedVendor) -> None:
    backend = SubprocessBackend(_cfg(), vendor)
    try:
        report = backend.call(ReportRequest())
        assert isinstance(report, ReportResponse) and backend.pid is not None
        os.kill(backend.pid, signal.SIGKILL)  # the enclave process we started dies
        epoch, key = report.report.epoch, report.report.public_key
        for c in range(2):
            sealed = seal_seed(os.urandom(32), SeedContext("t1", c, 0, os.urandom(16), key))
            backend.submit(RegisterRequest(epoch, c, 0, 5, sealed))
        answers = [backend.receive(), backend.receive()]
        # A fresh boot got both again and refused them: the old buffer is gone.
        for a in answers:
            assert isinstance(a, Refused) and a.code is RefusalCode.STALE_EPOCH
            assert a.epoch != epoch
        assert backend.restarts == 1 and backend.outstanding == 0
    finally:
        backend.close()


def _aggregator(
    backend: EnclaveBackend, cfg: FedBuffConfig, pipeline: int, p0: np.ndarray
) -> SecureFedBuff:
    return SecureFedBuff(
        cfg,
        p0,
        make_server_optimizer(ServerOptimizerConfig(), DIM),
        backend=backend,
        codec=FixedPointCodec(1.0, FRAC, RING, Rounding.NEAREST),
        weight_bits=S,
        pipeline=pipeline,
    )


def _client(vendor: SimulatedVendor, ecfg: EnclaveConfig) -> TeeClient:
    return TeeClient(
        vendor_public=vendor.public,
        expected=expected_measurement(ecfg),
        codec=FixedPointCodec(1.0, FRAC, RING, Rounding.NEAREST),
        task="t1",
        dim=DIM,
    )


def _deltas(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(DIM) * (0.02 + 0.03 * i)).astype(np.float32) for i in range(n)]


def _forged(up: MaskedUpdate) -> MaskedUpdate:
    s = up.sealed
    return replace(up, sealed=SealedSeed(s.update_id, s.ephemeral_public, bytes(len(s.ciphertext))))


CFG = FedBuffConfig(
    buffer_size=K, example_weighting="linear", staleness=StalenessConfig(kind="polynomial", a=0.5)
)
EXAMPLES = [3, 11, 1, 7, 20, 2, 5, 9, 4]
BASES = [0, 0, 0, 1, 0, 1, 2, 1, 2]


@pytest.mark.parametrize(("kind", "pipeline"), [("inprocess", 4), ("late", 2), ("subprocess", 8)])
def test_pipelined_aggregator_equals_the_waiting_one_exactly(
    vendor: SimulatedVendor, kind: str, pipeline: int
) -> None:
    # Nearest rounding makes every encoding deterministic and the masks cancel exactly, so a
    # pipelined and a waiting aggregator must decode bit-identical sums and take identical
    # steps; plain FedBuff agrees within the fixed-point bound. Mixed staleness, linear
    # example weights.
    ecfg = _cfg()
    p0 = np.linspace(-1, 1, DIM, dtype=np.float32)
    waiting_backend = InProcessBackend(ecfg, vendor)
    piped_backend = _backend(kind, ecfg, vendor)
    try:
        waiting = _aggregator(waiting_backend, CFG, 0, p0)
        piped = _aggregator(piped_backend, CFG, pipeline, p0)
        plain = FedBuff(CFG, p0, make_server_optimizer(ServerOptimizerConfig(), DIM))
        client = _client(vendor, ecfg)
        rng = np.random.default_rng(0)
        for i, d in enumerate(_deltas(9, 5)):
            outs = []
            for agg in (waiting, piped):
                up = client.upload(
                    agg.report,
                    client_id=i,
                    base_version=BASES[i],
                    num_examples=EXAMPLES[i],
                    delta=d,
                    rng=rng,
                )
                outs.append(agg.on_masked_update(up))
                assert piped_backend.outstanding <= pipeline
            ref = plain.on_update(Update(i, BASES[i], EXAMPLES[i], d))
            assert outs[0].accepted and outs[1].accepted and ref.accepted
            assert outs[0].weight == outs[1].weight and outs[0].staleness == ref.staleness
            assert (outs[0].step is None) == (outs[1].step is None) == (ref.step is None)
        assert waiting.version == piped.version == plain.version == 3
        np.testing.assert_array_equal(piped.params, waiting.params)
        total = max(sum(EXAMPLES[3 * j : 3 * j + 3]) for j in range(3))
        assert np.abs(piped.params - plain.params).max() <= 3 * piped.error_bound(total) + 1e-6
        assert np.abs(piped.params - p0).max() > 0.01  # the steps moved the model
    finally:
        waiting_backend.close()
        piped_backend.close()


def test_late_refusal_is_subtracted_and_never_released(vendor: SimulatedVendor) -> None:
    ecfg = _cfg()
    p0 = np.linspace(-1, 1, DIM, dtype=np.float32)
    cfg = FedBuffConfig(buffer_size=K, example_weighting="linear")
    agg = _aggregator(_LateBackend(ecfg, vendor), cfg, 4, p0)
    waiting = _aggregator(InProcessBackend(ecfg, vendor), cfg, 0, p0)
    client = _client(vendor, ecfg)
    rng = np.random.default_rng(1)
    deltas = _deltas(4, 6)

    def up(agg: SecureFedBuff, i: int) -> MaskedUpdate:
        return client.upload(
            agg.report,
            client_id=i,
            base_version=0,
            num_examples=EXAMPLES[i],
            delta=deltas[i],
            rng=rng,
        )

    assert agg.on_masked_update(up(agg, 0)).accepted
    forged = agg.on_masked_update(_forged(up(agg, 1)))
    assert forged.accepted and agg.buffered == 2  # provisional: its answer is not in yet
    out = agg.on_masked_update(up(agg, 2))  # K buffered: every answer is read
    assert out.accepted and out.discarded == 1 and out.step is None
    assert agg.rejected == {"bad_seal": 1} and agg.buffered == 2
    out = agg.on_masked_update(up(agg, 1))  # the client's genuine upload is welcome
    assert out.accepted and out.step is not None and out.step.num_updates == 3
    for i in (0, 2, 1):
        assert waiting.on_masked_update(up(waiting, i)).accepted
    # The step is exactly that of the three genuine uploads: the forged one left no trace.
    np.testing.assert_array_equal(agg.params, waiting.params)
    # Its own refusal, when known in time, is the arrival's answer (no provisional accept).
    eager = _aggregator(InProcessBackend(ecfg, vendor), cfg, 4, p0)
    out = eager.on_masked_update(_forged(up(eager, 3)))
    assert not out.accepted and out.reason == "bad_seal" and eager.buffered == 0
    assert not eager.masked_sum.any()


def test_restart_with_registrations_in_flight_discards_the_buffer(
    vendor: SimulatedVendor,
) -> None:
    ecfg = _cfg()
    p0 = np.linspace(-1, 1, DIM, dtype=np.float32)
    cfg = FedBuffConfig(buffer_size=K, example_weighting="equal")
    backend = _LateBackend(ecfg, vendor)
    agg = _aggregator(backend, cfg, 4, p0)
    client = _client(vendor, ecfg)
    rng = np.random.default_rng(2)
    deltas = _deltas(6, 7)
    old = agg.report

    def up(i: int) -> MaskedUpdate:
        return client.upload(
            agg.report, client_id=i, base_version=0, num_examples=1, delta=deltas[i], rng=rng
        )

    assert agg.on_masked_update(up(0)).accepted
    backend.restart()  # the enclave loses its buffer; the aggregator does not know yet
    assert agg.on_masked_update(up(1)).accepted  # sealed to the old boot: refused, later
    out = agg.on_masked_update(up(2))
    assert not out.accepted and out.reason == "stale_epoch" and out.discarded == 2
    assert agg.buffered == 0 and not agg.masked_sum.any() and agg.enclave_restarts == 1
    assert agg.report.epoch != old.epoch
    for i in (3, 4, 5):
        out = agg.on_masked_update(up(i))
    assert out.step is not None and out.step.num_updates == 3 and agg.version == 1


def test_subprocess_crash_mid_pipeline_then_the_run_continues(vendor: SimulatedVendor) -> None:
    ecfg = _cfg(min_contributions=2)
    cfg = FedBuffConfig(buffer_size=2, example_weighting="equal")
    backend = SubprocessBackend(ecfg, vendor)
    try:
        agg = _aggregator(backend, cfg, 8, np.zeros(DIM, np.float32))
        client = _client(vendor, ecfg)
        rng = np.random.default_rng(3)
        deltas = _deltas(6, 8)

        def up(i: int) -> MaskedUpdate:
            return client.upload(
                agg.report,
                client_id=i,
                base_version=agg.version,
                num_examples=1,
                delta=deltas[i],
                rng=rng,
            )

        assert agg.on_masked_update(up(0)).accepted
        assert agg.on_masked_update(up(1)).step is not None
        assert agg.on_masked_update(up(2)).accepted
        assert backend.pid is not None
        os.kill(backend.pid, signal.SIGKILL)
        out = agg.on_masked_update(up(3))
        assert not out.accepted and out.reason == "stale_epoch" and out.discarded == 1
        assert backend.restarts == 1 and agg.buffered == 0
        assert agg.on_masked_update(up(4)).accepted
        out = agg.on_masked_update(up(5))
        assert out.step is not None and agg.version == 2
    finally:
        backend.close()


def test_pipeline_must_not_be_negative(vendor: SimulatedVendor) -> None:
    with pytest.raises(ValueError, match="pipeline"):
        _aggregator(InProcessBackend(_cfg(), vendor), CFG, -1, np.zeros(DIM, np.float32))


def test_frames_with_large_parts_arrive_intact() -> None:
    a, b = socket.socketpair()
    big = np.arange(300_000, dtype=np.uint32)  # 1.2 MB: more than one socket buffer
    parts: list[bytes | memoryview] = [b"head", big.data.cast("B"), b"tail", b"x" * 70_000]
    expect = b"".join(bytes(p) for p in parts)
    small = [[b"one"], [b"t", b"wo"], [b"three" * 5000]]

    def send() -> None:
        send_parts(a, parts)
        send_frames(a, small)
        send_frame(a, b"")

    sender = threading.Thread(target=send)
    sender.start()
    try:
        reader = FrameReader(size=64)  # tiny: every frame here outgrows or wraps it
        assert bytes(reader.read(b)) == expect
        assert bytes(reader.read(b)) == b"one"
        assert bytes(reader.read(b)) == b"two"
        assert bytes(reader.read(b)) == b"three" * 5000
        assert bytes(reader.read(b)) == b""
        assert not reader.has_frame()
    finally:
        sender.join()
    # Several frames that arrived together are read with no further system call.
    send_frames(a, [[b"x"], [b"yz"]])
    reader = FrameReader()
    assert bytes(reader.read(b)) == b"x" and reader.has_frame()
    b.setblocking(False)  # a recv now would raise: the second frame must come from the buffer
    assert bytes(reader.read(b)) == b"yz"
    b.setblocking(True)
    a.sendall((MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match="exceeds"):
        FrameReader().read(b)
    a.sendall(b"\x00\x00\x00\x09abc")  # 3 of 9 announced bytes, then the peer leaves
    a.close()
    with pytest.raises(EOFError, match="incomplete"):
        FrameReader().read(b)
    b.close()


def test_a_release_can_name_the_shared_output_region(vendor: SimulatedVendor) -> None:
    region = np.arange(DIM, dtype=np.uint64) * np.uint64(3**30)
    rel = Released(b"e" * 16, 3, 9, 0.5, region)
    frame = b"".join(encode_parts(rel, region))
    assert len(frame) < 100  # named, not carried
    back = decode(frame, region)
    assert isinstance(back, Released) and back.unmask is region and back.total_weight == 9
    for other in (None, region[:-1].copy(), region.astype(np.uint32)):
        with pytest.raises(ProtocolError, match="shared region"):
            decode(frame, other)
    # A vector that is not the region travels in the frame as before.
    carried = decode(b"".join(encode_parts(rel, region.copy())))
    assert isinstance(carried, Released)
    np.testing.assert_array_equal(carried.unmask, region)
    # The subprocess enclave releases through its region: the host's view is read-only.
    backend = SubprocessBackend(_cfg(min_contributions=1), vendor)
    try:
        report = backend.call(ReportRequest())
        assert isinstance(report, ReportResponse)
        seed = os.urandom(32)
        key, epoch = report.report.public_key, report.report.epoch
        sealed = seal_seed(seed, SeedContext("t1", 4, 0, os.urandom(16), key))
        assert isinstance(backend.call(RegisterRequest(epoch, 4, 0, 1500, sealed)), Registered)
        out = backend.call(ReleaseRequest(epoch, (sealed.update_id,)))
        assert isinstance(out, Released) and not out.unmask.flags.writeable
        assert out.unmask.tolist() == _minus_weighted_masks([seed], [1500])
    finally:
        backend.close()


@pytest.mark.parametrize("pipeline", [0, 4])
def test_unreduced_upload_is_refused_and_leaves_no_trace(
    vendor: SimulatedVendor, monkeypatch: pytest.MonkeyPatch, pipeline: int
) -> None:
    # The 2^62 ring's range check runs chunk by chunk inside the add; an element >= 2^62 in
    # a late chunk must undo the chunks already added.
    from asyncfl.algorithms import secure_fedbuff

    monkeypatch.setattr(secure_fedbuff, "_CHUNK", 8)
    ecfg = _cfg()
    agg = _aggregator(InProcessBackend(ecfg, vendor), CFG, pipeline, np.zeros(DIM, np.float32))
    client = _client(vendor, ecfg)
    rng = np.random.default_rng(4)
    deltas = _deltas(2, 9)
    ups = [
        client.upload(agg.report, client_id=i, base_version=0, num_examples=3, delta=d, rng=rng)
        for i, d in enumerate(deltas)
    ]
    assert agg.on_masked_update(ups[0]).accepted
    before = agg.masked_sum.copy()
    bad = ups[1].masked.copy()
    bad[30] |= np.uint64(1 << RING)
    out = agg.on_masked_update(replace(ups[1], masked=bad))
    assert not out.accepted and out.reason == "bad_shape" and "2^62" in (out.detail or "")
    np.testing.assert_array_equal(agg.masked_sum, before)
    assert agg.buffered == 1
    assert agg.on_masked_update(ups[1]).accepted  # the reduced upload is fine
