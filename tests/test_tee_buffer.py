"""The TEE secure buffer: enclave, attestation, sealing, SecureFedBuff, backends."""

from __future__ import annotations

import math
import os
import signal
from dataclasses import replace

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from asyncfl.algorithms.fedbuff import FedBuff, FedBuffConfig
from asyncfl.algorithms.secure_fedbuff import SecureFedBuff, quantise_weight
from asyncfl.core.server_opt import ServerOptimizerConfig, make_server_optimizer
from asyncfl.core.update import Update
from asyncfl.core.weights import StalenessConfig
from asyncfl.errors import CryptoError, ProtocolError
from asyncfl.privacy.noise import SeededNoise
from asyncfl.secure.fixedpoint import FixedPointCodec, Rounding
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
    Request,
    Response,
    SealedSeed,
    decode,
    encode,
)
from asyncfl.secure.tee.sealing import SeedContext, seal_seed

DIM = 37
RING = 62
FRAC = 20
S = 10
K = 3
MOD = 1 << RING


def _cfg(**kw: object) -> EnclaveConfig:
    base = EnclaveConfig(
        task="t1",
        dim=DIM,
        ring_bits=RING,
        frac_bits=FRAC,
        clip=1.0,
        weight_bits=S,
        min_contributions=K,
        max_weight=(1 << S) * 50,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def vendor() -> SimulatedVendor:
    return SimulatedVendor.generate()


def _seal(
    enclave: SecureBufferEnclave, seed: bytes, client: int, base: int = 0, task: str = "t1"
) -> SealedSeed:
    ctx = SeedContext(task, client, base, os.urandom(16), enclave.report.public_key)
    return seal_seed(seed, ctx)


def _reg(
    enclave: SecureBufferEnclave,
    sealed: SealedSeed,
    client: int,
    weight: int,
    base: int = 0,
    epoch: bytes | None = None,
) -> object:
    req = RegisterRequest(epoch or enclave.report.epoch, client, base, weight, sealed)
    return decode(enclave.handle(encode(req)))


def _mask_ref(seed: bytes) -> list[int]:
    """Independent mask: AES-256-CTR keystream from the cryptography library, Python ints."""
    ks = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(8 * DIM))
    return [int.from_bytes(ks[8 * i : 8 * i + 8], "little") % MOD for i in range(DIM)]


def test_messages_round_trip_and_malformed_frames_are_refused(vendor: SimulatedVendor) -> None:
    e = SecureBufferEnclave(_cfg(), vendor)
    sealed = _seal(e, os.urandom(32), 7)
    msgs: list[Request | Response] = [
        ReportRequest(),
        RegisterRequest(e.report.epoch, 7, 3, 99, sealed),
        ReleaseRequest(e.report.epoch, (b"a" * 16, b"b" * 16)),
        DiscardRequest(e.report.epoch),
        ReportResponse(e.report),
        Registered(e.report.epoch, 2, 5),
        Discarded(e.report.epoch, 4),
        Refused(e.report.epoch, RefusalCode.MISMATCH, "why ü"),
    ]
    for m in msgs:
        assert decode(encode(m)) == m
    rel = Released(e.report.epoch, 3, 9, 0.5, np.arange(DIM, dtype=np.uint64) * 2**40)
    back = decode(encode(rel))
    assert isinstance(back, Released) and back.noise_std == 0.5
    np.testing.assert_array_equal(back.unmask, rel.unmask)
    frame = encode(msgs[1])
    for bad in (b"XXXX" + frame[4:], frame[:4] + b"\x02" + frame[5:], frame[:-1], frame + b"\0"):
        with pytest.raises(ProtocolError):
            decode(bad)
        out = decode(e.handle(bad))
        assert isinstance(out, Refused) and out.code is RefusalCode.MALFORMED
    assert e.buffered == 0


def test_release_refused_below_k_then_equals_minus_weighted_mask_sum(
    vendor: SimulatedVendor,
) -> None:
    e = SecureBufferEnclave(_cfg(), vendor)
    seeds = [os.urandom(32) for _ in range(K)]
    weights = [1024, 517, 3 * 700]  # distinct, asymmetric
    ids = []
    for c, (seed, w) in enumerate(zip(seeds[:2], weights, strict=False)):
        sealed = _seal(e, seed, 10 + c)
        assert isinstance(_reg(e, sealed, 10 + c, w), Registered)
        ids.append(sealed.update_id)
    out = decode(e.handle(encode(ReleaseRequest(e.report.epoch, tuple(ids)))))
    assert isinstance(out, Refused) and out.code is RefusalCode.BELOW_THRESHOLD
    assert e.buffered == 2  # refusal left the buffer as it was
    sealed = _seal(e, seeds[2], 12)
    assert isinstance(_reg(e, sealed, 12, weights[2]), Registered)
    # Naming a subset is refused: nothing partial is released.
    out = decode(e.handle(encode(ReleaseRequest(e.report.epoch, tuple(ids)))))
    assert isinstance(out, Refused) and out.code is RefusalCode.MISMATCH
    ids.append(sealed.update_id)
    out = decode(e.handle(encode(ReleaseRequest(e.report.epoch, tuple(ids)))))
    assert isinstance(out, Released) and out.count == K and out.total_weight == sum(weights)
    masks = [_mask_ref(s) for s in seeds]
    ref = [(-sum(w * m[i] for w, m in zip(weights, masks, strict=True))) % MOD for i in range(DIM)]
    assert out.unmask.tolist() == ref
    assert e.buffered == 0


def test_duplicate_and_replayed_contributions_are_refused(vendor: SimulatedVendor) -> None:
    e = SecureBufferEnclave(_cfg(), vendor)
    first = _seal(e, os.urandom(32), 1)
    assert isinstance(_reg(e, first, 1, 5), Registered)
    for sealed, client, code in [
        (first, 1, RefusalCode.DUPLICATE),  # the same contribution again
        (_seal(e, os.urandom(32), 1), 1, RefusalCode.DUPLICATE),  # same client, 2nd update
    ]:
        out = _reg(e, sealed, client, 5)
        assert isinstance(out, Refused) and out.code is code
    ids = [first.update_id]
    for c in (2, 3):
        s = _seal(e, os.urandom(32), c)
        assert isinstance(_reg(e, s, c, 5), Registered)
        ids.append(s.update_id)
    dup = ReleaseRequest(e.report.epoch, (ids[0], ids[0], ids[1], ids[2]))
    out = decode(e.handle(encode(dup)))
    assert isinstance(out, Refused) and out.code is RefusalCode.MISMATCH
    assert isinstance(
        decode(e.handle(encode(ReleaseRequest(e.report.epoch, tuple(ids))))), Released
    )
    # After the release the same sealed seed cannot join a later buffer.
    out = _reg(e, first, 1, 5)
    assert isinstance(out, Refused) and out.code is RefusalCode.REPLAYED
    for w in (0, _cfg().max_weight + 1):
        out = _reg(e, _seal(e, os.urandom(32), 9), 9, w)
        assert isinstance(out, Refused) and out.code is RefusalCode.BAD_WEIGHT


def test_rebound_or_moved_seeds_are_refused(vendor: SimulatedVendor) -> None:
    e = SecureBufferEnclave(_cfg(), vendor)
    sealed = _seal(e, os.urandom(32), 4, base=6)
    for client, base in [(5, 6), (4, 7)]:  # another client id, another base version
        out = _reg(e, sealed, client, 3, base=base)
        assert isinstance(out, Refused) and out.code is RefusalCode.BAD_SEAL
    other_task = _seal(e, os.urandom(32), 4, base=6, task="t2")
    out = _reg(e, other_task, 4, 3, base=6)
    assert isinstance(out, Refused) and out.code is RefusalCode.BAD_SEAL
    flipped = replace(
        sealed, ciphertext=sealed.ciphertext[:-1] + bytes([sealed.ciphertext[-1] ^ 1])
    )
    out = _reg(e, flipped, 4, 3, base=6)
    assert isinstance(out, Refused) and out.code is RefusalCode.BAD_SEAL
    # A seed sealed to one boot does not open in the next one, even under the new epoch.
    e2 = SecureBufferEnclave(_cfg(), vendor)
    out = _reg(e2, sealed, 4, 3, base=6, epoch=e.report.epoch)
    assert isinstance(out, Refused) and out.code is RefusalCode.STALE_EPOCH
    out = _reg(e2, sealed, 4, 3, base=6)
    assert isinstance(out, Refused) and out.code is RefusalCode.BAD_SEAL
    assert e.buffered == 0 and e2.buffered == 0
    assert isinstance(_reg(e, sealed, 4, 3, base=6), Registered)  # refusals burnt nothing


def test_client_refuses_wrong_measurement_or_vendor(vendor: SimulatedVendor) -> None:
    cfg = _cfg()
    e = SecureBufferEnclave(cfg, vendor)
    codec = FixedPointCodec(1.0, FRAC, RING)
    delta = np.linspace(-0.5, 0.5, DIM, dtype=np.float32)
    rng = np.random.default_rng(0)

    def client(expected: bytes, vendor_public: bytes) -> TeeClient:
        return TeeClient(
            vendor_public=vendor_public, expected=expected, codec=codec, task="t1", dim=DIM
        )

    good = client(expected_measurement(cfg), vendor.public)
    assert good.upload(
        e.report, client_id=1, base_version=0, num_examples=3, delta=delta, rng=rng
    ).masked.shape == (DIM,)
    k_other = expected_measurement(replace(cfg, min_contributions=1))  # a K=1 enclave
    with pytest.raises(ProtocolError, match="measurement"):
        client(k_other, vendor.public).upload(
            e.report, client_id=1, base_version=0, num_examples=3, delta=delta, rng=rng
        )
    with pytest.raises(CryptoError, match="signature"):
        client(expected_measurement(cfg), SimulatedVendor.generate().public).upload(
            e.report, client_id=1, base_version=0, num_examples=3, delta=delta, rng=rng
        )
    # A report whose key was swapped (a man in the middle) fails the vendor signature.
    swapped = replace(e.report, public_key=SecureBufferEnclave(cfg, vendor).report.public_key)
    with pytest.raises(CryptoError):
        good.upload(swapped, client_id=1, base_version=0, num_examples=3, delta=delta, rng=rng)
    # An enclave with the wrong config measures differently.
    bad = SecureBufferEnclave(replace(cfg, min_contributions=1), vendor)
    with pytest.raises(ProtocolError, match="measurement"):
        good.upload(bad.report, client_id=1, base_version=0, num_examples=3, delta=delta, rng=rng)


def test_quantised_weight() -> None:
    assert quantise_weight(1.0, 10) == 1024
    assert quantise_weight(2**-0.5, 10) == 724  # 724.08
    assert quantise_weight(0.0, 10) == 1  # clamped: never a free contribution
    with pytest.raises(ValueError):
        quantise_weight(1.5, 10)


def _setup(
    vendor: SimulatedVendor,
    cfg: FedBuffConfig,
    *,
    subprocess: bool = False,
    mixing: float = 1.0,
    rounding: Rounding = Rounding.STOCHASTIC,
) -> tuple[SecureFedBuff, FedBuff, TeeClient, InProcessBackend | SubprocessBackend]:
    ecfg = _cfg(min_contributions=cfg.buffer_size)
    backend = SubprocessBackend(ecfg, vendor) if subprocess else InProcessBackend(ecfg, vendor)
    codec = FixedPointCodec(1.0, FRAC, RING, rounding)
    p0 = np.linspace(-1, 1, DIM, dtype=np.float32)
    opt = ServerOptimizerConfig()
    agg = SecureFedBuff(
        cfg,
        p0,
        make_server_optimizer(opt, DIM),
        backend=backend,
        codec=codec,
        weight_bits=S,
        mixing_rate=mixing,
    )
    plain = FedBuff(cfg, p0, make_server_optimizer(opt, DIM), mixing_rate=mixing)
    client = TeeClient(
        vendor_public=vendor.public,
        expected=expected_measurement(ecfg),
        codec=codec,
        task="t1",
        dim=DIM,
    )
    return agg, plain, client, backend


def _deltas(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(DIM) * (0.02 + 0.02 * i)).astype(np.float32) for i in range(n)]


def test_secure_fedbuff_matches_reference_on_asymmetric_inputs(vendor: SimulatedVendor) -> None:
    cfg = FedBuffConfig(
        buffer_size=K,
        example_weighting="linear",
        staleness=StalenessConfig(kind="polynomial", a=0.5),
    )
    agg, plain, client, _ = _setup(vendor, cfg)
    rng = np.random.default_rng(1)
    deltas = _deltas(6, 2)
    examples = [3, 11, 1, 7, 20, 2]
    bases = [0, 0, 0, 1, 0, 1]  # second step mixes staleness 0 and 1
    ref = np.linspace(-1, 1, DIM, dtype=np.float32).astype(np.float64)
    for step in range(2):
        idx = range(3 * step, 3 * step + 3)
        num = sum(
            ((1 + step - bases[i]) ** -0.5) * examples[i] * deltas[i].astype(np.float64)
            for i in idx
        )
        ref = ref - num / sum(examples[i] for i in idx)
        for i in idx:
            up = client.upload(
                agg.report,
                client_id=i,
                base_version=bases[i],
                num_examples=examples[i],
                delta=deltas[i],
                rng=rng,
            )
            out = agg.on_masked_update(up)
            plain.on_update(Update(i, bases[i], examples[i], deltas[i]))
            assert out.accepted and out.staleness == step - bases[i]
        assert agg.version == step + 1
        bound = agg.error_bound(sum(examples[i] for i in idx))
        # Each step adds at most one bound; float32 storage of params adds ~1e-7.
        assert np.abs(agg.params - ref).max() <= (step + 1) * bound + 1e-6
        assert np.abs(agg.params - plain.params).max() <= (step + 1) * bound + 1e-6
    # The staleness-1 weight 1/sqrt(2) is quantised to 724/1024; the bound must cover it,
    # but it must not be so loose that dropping the staleness weight would pass.
    assert np.abs(agg.params - ref).max() > 0
    assert bound < 1e-3


def _arrays(obj: object, seen: set[int] | None = None) -> list[np.ndarray]:
    """Every numpy array reachable from the aggregator's own state (not the enclave's)."""
    seen = seen or set()
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, InProcessBackend | SubprocessBackend):
        return []  # the enclave's side of the boundary
    out: list[np.ndarray] = []
    items = (
        obj.values()
        if isinstance(obj, dict)
        else obj
        if isinstance(obj, list | tuple | set)
        else (vars(obj).values() if hasattr(obj, "__dict__") else ())
    )
    for v in items:
        out += _arrays(v, seen)
    return out


def test_server_state_never_holds_an_individual_unmasked_update(vendor: SimulatedVendor) -> None:
    cfg = FedBuffConfig(buffer_size=K, example_weighting="equal")
    agg, _, client, _ = _setup(vendor, cfg, rounding=Rounding.NEAREST)
    codec = agg.codec
    deltas = _deltas(5, 3)
    encoded = [codec.encode(d, 1) for d in deltas]
    with pytest.raises(ProtocolError):
        agg.on_update(Update(0, 0, 1, deltas[0]))
    rng = np.random.default_rng(0)
    inspected = 0
    for i, d in enumerate(deltas):
        out = agg.on_masked_update(
            client.upload(agg.report, client_id=i, base_version=0, num_examples=1, delta=d, rng=rng)
        )
        assert out.accepted
        for raw in _arrays(agg):
            if raw.dtype == codec.ring.dtype and raw.shape == (DIM,):
                inspected += int(raw.any())
                arr = codec.ring.reduce(raw.copy())
                for q, dd in zip(encoded, deltas, strict=True):
                    for w in (1, 1 << S, quantise_weight(0.5**0.5, S)):
                        hit = np.count_nonzero(arr == codec.ring.reduce(q * np.uint64(w)))
                        assert hit < DIM // 4, "an encoded update sits in the server's state"
                    if arr.any():
                        # Masked data decodes to noise spread over the whole ring.
                        as_float = codec.decode_sum(arr, 1)
                        assert np.abs(as_float - dd).max() > 10.0
    assert agg.version == 1 and agg.buffered == 2
    assert inspected >= 4  # the masked buffer (and scratch) were really examined


def test_enclave_restart_discards_buffer_and_run_continues(vendor: SimulatedVendor) -> None:
    cfg = FedBuffConfig(
        buffer_size=K, example_weighting="equal", staleness=StalenessConfig(kind="constant")
    )
    agg, plain, client, backend = _setup(vendor, cfg)
    rng = np.random.default_rng(4)
    deltas = _deltas(6, 5)
    old_report = agg.report
    for i in range(2):
        assert agg.on_masked_update(
            client.upload(
                agg.report, client_id=i, base_version=0, num_examples=1, delta=deltas[i], rng=rng
            )
        ).accepted
    backend.restart()
    out = agg.on_masked_update(
        client.upload(
            old_report, client_id=2, base_version=0, num_examples=1, delta=deltas[2], rng=rng
        )
    )
    assert not out.accepted and out.reason == "stale_epoch" and out.discarded == 2
    assert agg.buffered == 0 and agg.masked_sum.any() == False  # noqa: E712
    assert agg.report.epoch != old_report.epoch and agg.enclave_restarts == 1
    for i in range(3, 6):
        out = agg.on_masked_update(
            client.upload(
                agg.report, client_id=i, base_version=0, num_examples=1, delta=deltas[i], rng=rng
            )
        )
        plain.on_update(Update(i, 0, 1, deltas[i]))
    assert out.step is not None and agg.version == 1
    # Only the three post-restart updates moved the model.
    assert np.abs(agg.params - plain.params).max() <= agg.error_bound(3) + 1e-6


def test_subprocess_enclave_end_to_end_and_process_crash(vendor: SimulatedVendor) -> None:
    cfg = FedBuffConfig(buffer_size=2, example_weighting="linear")
    agg, plain, client, backend = _setup(vendor, cfg, subprocess=True)
    assert isinstance(backend, SubprocessBackend)
    try:
        rng = np.random.default_rng(6)
        deltas = _deltas(7, 7)
        for i in range(4):
            base = agg.version
            agg.on_masked_update(
                client.upload(
                    agg.report,
                    client_id=i,
                    base_version=base,
                    num_examples=i + 1,
                    delta=deltas[i],
                    rng=rng,
                )
            )
            plain.on_update(Update(i, base, i + 1, deltas[i]))
        assert agg.version == plain.version == 2
        assert np.abs(agg.params - plain.params).max() <= 2 * agg.error_bound(3) + 1e-6
        agg.on_masked_update(
            client.upload(
                agg.report, client_id=4, base_version=2, num_examples=1, delta=deltas[4], rng=rng
            )
        )
        pid = backend.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # the enclave process we started dies
        out = agg.on_masked_update(
            client.upload(
                agg.report, client_id=5, base_version=2, num_examples=1, delta=deltas[5], rng=rng
            )
        )
        assert not out.accepted and out.discarded == 1 and backend.restarts == 1
        for i in (5, 6):
            out = agg.on_masked_update(
                client.upload(
                    agg.report,
                    client_id=i,
                    base_version=2,
                    num_examples=1,
                    delta=deltas[i],
                    rng=rng,
                )
            )
        assert out.step is not None and agg.version == 3
    finally:
        backend.close()


def test_dp_hook_noise_in_the_ring(vendor: SimulatedVendor) -> None:
    sigma = 0.3
    cfg = _cfg(dim=4000, min_contributions=2, noise_std=sigma)
    e = SecureBufferEnclave(cfg, vendor, noise=SeededNoise(11))
    seeds = [os.urandom(32) for _ in range(2)]
    ids = []
    for c, s in enumerate(seeds):
        sealed = _seal(e, s, c)
        assert isinstance(_reg(e, sealed, c, 1 << S), Registered)
        ids.append(sealed.update_id)
    out = decode(e.handle(encode(ReleaseRequest(e.report.epoch, tuple(ids)))))
    assert isinstance(out, Released) and out.noise_std == sigma
    ring = FixedPointCodec(1.0, FRAC, RING).ring
    from asyncfl.secure.prg import MaskExpander

    exp = MaskExpander(ring, 4000)
    masks = ring.add(exp.expand(seeds[0]), exp.expand(seeds[1])) * np.uint64(1 << S)
    noise_ring = ring.reduce(out.unmask + ring.reduce(masks))
    signed = noise_ring.astype(np.int64)
    signed = np.where(signed >= 1 << (RING - 1), signed - (1 << RING), signed)
    noise = signed / 2.0 ** (FRAC + S)
    # Sample std of 4000 normals: relative sd 1/sqrt(2*4000) ~= 1.1%; 5% is > 4 sd.
    assert abs(noise.std() / sigma - 1) < 0.05 and abs(noise.mean()) < 5 * sigma / 4000**0.5
    assert np.abs(noise).max() <= 9.42 * sigma + 2.0 ** -(FRAC + S)


def test_accumulate_with_scale_matches_plain_integer_reference() -> None:
    from asyncfl.secure.prg import MaskExpander
    from asyncfl.secure.ring import Ring

    seed = bytes(range(32))
    for bits in (20, 32, 62, 64):
        ring = Ring(bits)
        acc = ring.reduce(np.arange(7, 7 + DIM, dtype=ring.dtype) * ring.dtype.type(12345))
        start = [int(v) for v in acc]
        MaskExpander(ring, DIM).accumulate(acc, seed, scale=3 * 1024 + 7)
        MaskExpander(ring, DIM).accumulate(acc, seed, negate=True)
        ring.reduce(acc)
        width = ring.dtype.itemsize
        stream = (
            Cipher(algorithms.AES(seed), modes.CTR(bytes(16)))
            .encryptor()
            .update(bytes(DIM * width))
        )
        words = [int.from_bytes(stream[i * width : (i + 1) * width], "little") for i in range(DIM)]
        ref = [
            (a + (3 * 1024 + 7 - 1) * m) % (1 << bits) for a, m in zip(start, words, strict=True)
        ]
        assert [int(v) for v in acc] == ref, bits
    with pytest.raises(ValueError, match="scale"):
        MaskExpander(Ring(32), DIM).accumulate(Ring(32).zeros(DIM), seed, scale=0)


def test_smallest_ring_is_chosen_and_gives_identical_results(vendor: SimulatedVendor) -> None:
    from asyncfl.secure.tee.enclave import with_smallest_ring

    # f=12, S=10, K=3, max weight 2^10 * 50: 3 * 51200 * 2^12 < 2^31 fits; 2^20 units do not.
    small = with_smallest_ring(_cfg(frac_bits=12))
    assert small.ring_bits == 32 and with_smallest_ring(_cfg()).ring_bits == RING
    assert with_smallest_ring(_cfg(frac_bits=12, min_contributions=300)).ring_bits == RING
    assert with_smallest_ring(_cfg(frac_bits=12, noise_std=2.0**12)).ring_bits == RING
    cfg = FedBuffConfig(buffer_size=K, example_weighting="linear")
    results = []
    for ecfg in (_cfg(frac_bits=12), small):
        backend = InProcessBackend(ecfg, vendor)
        codec = FixedPointCodec(1.0, 12, ecfg.ring_bits)
        p0 = np.linspace(-1, 1, DIM, dtype=np.float32)
        agg = SecureFedBuff(
            cfg,
            p0,
            make_server_optimizer(ServerOptimizerConfig(), DIM),
            backend=backend,
            codec=codec,
            weight_bits=S,
        )
        client = TeeClient(
            vendor_public=vendor.public,
            expected=expected_measurement(ecfg),
            codec=codec,
            task="t1",
            dim=DIM,
        )
        rng = np.random.default_rng(8)
        for i, d in enumerate(_deltas(6, 9)):
            up = client.upload(
                agg.report,
                client_id=i,
                base_version=max(agg.version - 1, 0),
                num_examples=[5, 1, 50, 2, 9, 30][i],
                delta=d,
                rng=rng,
            )
            assert agg.on_masked_update(up).accepted
        assert agg.version == 2 and agg.masked_sum.dtype == codec.ring.dtype
        results.append(agg.params.copy())
    np.testing.assert_array_equal(results[0], results[1])  # no sum wraps in either ring


@pytest.mark.parametrize("subprocess", [False, True])
def test_refused_registration_leaves_the_masked_sum_unchanged(
    vendor: SimulatedVendor, subprocess: bool
) -> None:
    # The aggregator adds each upload while the enclave validates it and subtracts it again
    # on a refusal: weight 1 (constant staleness, equal examples, S = 0) and weight != 1.
    for staleness, weight_bits in ((StalenessConfig(kind="constant"), 0), (StalenessConfig(), S)):
        cfg = FedBuffConfig(buffer_size=K, example_weighting="equal", staleness=staleness)
        ecfg = _cfg(weight_bits=weight_bits, max_weight=1 << weight_bits)
        backend = SubprocessBackend(ecfg, vendor) if subprocess else InProcessBackend(ecfg, vendor)
        try:
            codec = FixedPointCodec(1.0, FRAC, RING)
            agg = SecureFedBuff(
                cfg,
                np.zeros(DIM, np.float32),
                make_server_optimizer(ServerOptimizerConfig(), DIM),
                backend=backend,
                codec=codec,
                weight_bits=weight_bits,
            )
            client = TeeClient(
                vendor_public=vendor.public,
                expected=expected_measurement(ecfg),
                codec=codec,
                task="t1",
                dim=DIM,
            )
            rng = np.random.default_rng(2)
            deltas = _deltas(3, 4)
            ups = [
                client.upload(
                    agg.report, client_id=i, base_version=0, num_examples=1, delta=d, rng=rng
                )
                for i, d in enumerate(deltas)
            ]
            assert agg.on_masked_update(ups[0]).accepted
            before = agg.masked_sum.copy()
            sealed = ups[1].sealed
            forged = replace(
                ups[1],
                sealed=SealedSeed(
                    sealed.update_id, sealed.ephemeral_public, bytes(len(sealed.ciphertext))
                ),
            )
            out = agg.on_masked_update(forged)
            assert not out.accepted and out.reason == "bad_seal"
            np.testing.assert_array_equal(agg.masked_sum, before)
            assert agg.buffered == 1
            assert agg.on_masked_update(ups[1]).accepted  # the genuine upload still counts
        finally:
            backend.close()


def _dp_setup(
    vendor: SimulatedVendor, *, dim: int, enclave_std: float, agg_std: float, noise_seed: int | None
) -> tuple[SecureFedBuff, TeeClient, object]:
    from asyncfl.privacy import PrivacyConfig
    from asyncfl.sim.dp import DPMechanism

    pcfg = PrivacyConfig(
        noise_multiplier=0.8,
        clip_norm=0.5,
        cohort_size=K,
        population=100,
        delta=1e-4,
        sampling="async_approx",
        noise_source="seeded",
    )
    dp = DPMechanism(pcfg, noise_seed=0, site="enclave")
    ecfg = _cfg(dim=dim, noise_std=enclave_std, max_weight=1 << S)
    noise = None if noise_seed is None else SeededNoise(noise_seed)
    backend = InProcessBackend(ecfg, vendor, noise=noise)
    codec = FixedPointCodec(1.0, FRAC, RING, Rounding.NEAREST)
    agg = SecureFedBuff(
        FedBuffConfig(
            buffer_size=K, example_weighting="equal", staleness=StalenessConfig(kind="constant")
        ),
        np.linspace(-1, 1, dim, dtype=np.float32),
        make_server_optimizer(ServerOptimizerConfig(), dim),  # SGD, lr 1: x1 = x0 - g
        backend=backend,
        codec=codec,
        weight_bits=S,
        mixing_rate=0.5,  # every weight 2^(S-1): the realised total differs from K 2^S
        dp=dp,
        dp_noise_std=agg_std,
    )
    client = TeeClient(
        vendor_public=vendor.public,
        expected=expected_measurement(ecfg),
        codec=codec,
        task="t1",
        dim=dim,
    )
    return agg, client, dp


@pytest.mark.parametrize("noise_seed", [21, None])  # seeded research mode, OS CSPRNG
def test_dp_in_enclave_noises_every_release_with_fixed_denominator(
    vendor: SimulatedVendor, monkeypatch: pytest.MonkeyPatch, noise_seed: int | None
) -> None:
    from asyncfl.secure.tee.enclave import dp_noise_std
    from asyncfl.sim.dp import DPMechanism

    dim = 20_000
    sigma = dp_noise_std(0.8, 0.5, dim=dim, frac_bits=FRAC)
    assert sigma == pytest.approx(0.8 * (0.5 + dim**0.5 * 2.0**-FRAC))
    agg, client, dp = _dp_setup(
        vendor, dim=dim, enclave_std=sigma, agg_std=sigma, noise_seed=noise_seed
    )
    assert isinstance(dp, DPMechanism)
    unmasked: list[np.ndarray] = []
    real_decode = FixedPointCodec.decode_sum

    def spy(self: FixedPointCodec, ring_sum: np.ndarray, total_weight: int) -> np.ndarray:
        unmasked.append(ring_sum.copy())  # the only unmasked vector the server ever holds
        assert total_weight == K << S  # the fixed denominator K, not the realised weight
        return real_decode(self, ring_sum, total_weight)

    monkeypatch.setattr(FixedPointCodec, "decode_sum", spy)
    rng = np.random.default_rng(3)
    # Asymmetric norms ~0.14, ~1.4, ~14: the last two are clipped to C = 0.5 on the device.
    deltas = [dp.clip((rng.standard_normal(dim) * s).astype(np.float32)) for s in (1e-3, 1e-2, 0.1)]
    x0 = agg.params.astype(np.float64)
    for i, d in enumerate(deltas):
        out = agg.on_masked_update(
            client.upload(agg.report, client_id=i, base_version=0, num_examples=4, delta=d, rng=rng)
        )
        assert out.accepted
    assert out.step is not None and dp.accountant.steps == 1 and len(unmasked) == 1
    # Independent reference: plain integers for the un-noised weighted sum (weight 2^(S-1)).
    scale = 2.0**FRAC
    clean = sum(np.rint(np.clip(d.astype(np.float64), -1, 1) * scale) for d in deltas) * (
        1 << (S - 1)
    )
    signed = unmasked[0].astype(np.int64)
    signed = np.where(signed >= 1 << (RING - 1), signed - (1 << RING), signed).astype(np.float64)
    noise = (signed - clean) / 2.0 ** (FRAC + S)
    assert np.count_nonzero(noise == 0) < dim // 100, "the server held an un-noised sum"
    if noise_seed is not None:  # replay the seeded stream: the exact ring noise
        z = np.clip(SeededNoise(noise_seed).standard_normal(dim), -9.42, 9.42)
        np.testing.assert_array_equal(signed - clean, np.rint(z * sigma * 2.0 ** (FRAC + S)))
    # Sample std of 20000 normals: relative sd 1/sqrt(40000) = 0.5%; 3% is 6 sd.
    assert abs(noise.std() / sigma - 1) < 0.03 and abs(noise.mean()) < 5 * sigma / dim**0.5
    # Server SGD (lr 1) with g = (clean sum + noise) / (2^(f+S) K), rounded to float32.
    expected = (x0 - (signed / 2.0 ** (FRAC + S)) / K).astype(np.float32)
    np.testing.assert_allclose(agg.params, expected, rtol=0, atol=2e-7)


def test_dp_release_with_the_wrong_noise_is_never_used(vendor: SimulatedVendor) -> None:
    agg, client, dp = _dp_setup(vendor, dim=DIM, enclave_std=0.1, agg_std=0.4, noise_seed=5)
    rng = np.random.default_rng(1)
    x0 = agg.params.copy()
    for i, d in enumerate(_deltas(K, 6)):
        out = agg.on_masked_update(
            client.upload(agg.report, client_id=i, base_version=0, num_examples=1, delta=d, rng=rng)
        )
    assert out.step is None and out.discarded == K and agg.version == 0
    np.testing.assert_array_equal(agg.params, x0)
    assert dp.accountant.steps == 1  # type: ignore[attr-defined]  # released, so accounted


@pytest.mark.parametrize(
    ("k", "noise_std", "want"),
    [
        # A release fits when K 2^S 2^f (+ the tail 9.42 sigma 2^(f+S)) <= 2^31 - 1 (clip 1).
        # Bits go from f and S in turn from (24, 12); S stops at 8, then f goes on to 16.
        (2, 0.0, (20, 9)),  # f + S <= 29
        (10, 0.0, (19, 8)),  # f + S <= 27
        (100, 0.0, (16, 8)),  # f + S <= 24
        (10, 1.0, (18, 8)),  # (10 + 9.42) 2^(f+S) <= 2^31 - 1: f + S <= 26
        (1000, 0.0, None),  # f + S <= 21 is below the floors: stay in the 2^62 ring
    ],
)
def test_fit_ring32_keeps_the_most_precision_that_fits(
    k: int, noise_std: float, want: tuple[int, int] | None
) -> None:
    from asyncfl.secure.tee.enclave import fit_ring32

    def make(f: int, s: int) -> EnclaveConfig:
        return EnclaveConfig("t", 8, 32, f, 1.0, s, k, 1 << s, noise_std)

    got = fit_ring32(make, 24, 12)
    if want is None:
        assert got is None
        return
    assert got is not None and (got.frac_bits, got.weight_bits) == want
    f, s = want  # one bit more of either would not fit; this one does (plain integers)
    tail = math.ceil(9.42 * noise_std * 2.0 ** (f + s))
    assert k * (1 << (f + s)) + tail <= (1 << 31) - 1
    for more in (f + s + 1,):
        assert k * (1 << more) + math.ceil(9.42 * noise_std * 2.0**more) > (1 << 31) - 1
