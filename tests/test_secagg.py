"""SecAgg client/server state machines: transitions, replay, tampering, never-both, privacy."""

from __future__ import annotations

import dataclasses
import random
from typing import TypeVar

import numpy as np
import pytest
from scipy import stats  # type: ignore[import-untyped]

from asyncfl.errors import CryptoError, ProtocolError
from asyncfl.secure import crypto
from asyncfl.secure.secagg.client import ClientStage, SecAggClient
from asyncfl.secure.secagg.config import SecAggConfig
from asyncfl.secure.secagg.messages import (
    EncryptedShare,
    KeyBroadcast,
    ServerMessage,
    ShareBroadcast,
    UnmaskRequest,
)
from asyncfl.secure.secagg.server import RoundFailed, SecAggServer, ServerStage

SID = bytes(range(16))
D = 6


def _setup(n: int = 4, t: int = 3) -> tuple[SecAggConfig, dict[int, SecAggClient], SecAggServer]:
    cfg = SecAggConfig.secagg([10 + 3 * i for i in range(n)], D, t, session_id=SID)
    clients = {u: SecAggClient(u, cfg, random.Random(u).randbytes) for u in cfg.clients}
    return cfg, clients, SecAggServer(cfg)


def _inputs(cfg: SecAggConfig) -> dict[int, np.ndarray]:
    return {u: np.arange(D, dtype=np.uint32) * (u + 1) for u in cfg.clients}


M = TypeVar("M", KeyBroadcast, ShareBroadcast, UnmaskRequest)


def _only(msgs: list[ServerMessage], kind: type[M]) -> list[M]:
    out = [m for m in msgs if isinstance(m, kind)]
    assert len(out) == len(msgs)
    return out


def _to_masked(clients: dict[int, SecAggClient], server: SecAggServer) -> list[ShareBroadcast]:
    """Run rounds 0 and 1; return the ShareBroadcasts."""
    for c in clients.values():
        server.receive(c.advertise_keys())
    kb = {m.recipient: m for m in _only(server.advance(), KeyBroadcast)}
    for u, c in clients.items():
        server.receive(c.share_keys(kb[u]))
    return _only(server.advance(), ShareBroadcast)


def test_happy_path_and_stage_transitions() -> None:
    cfg, clients, server = _setup()
    xs = _inputs(cfg)
    sb = {m.recipient: m for m in _to_masked(clients, server)}
    assert all(c.stage is ClientStage.MASKED_INPUT for c in clients.values())
    assert server.stage is ServerStage.MASKED_INPUT
    for u, c in clients.items():
        server.receive(c.masked_input(sb[u], xs[u]))
    for r in _only(server.advance(), UnmaskRequest):
        server.receive(clients[r.recipient].unmask(r))
    assert server.advance() == []
    assert server.stage.name == "DONE"
    expected = np.sum([x.astype(np.uint64) for x in xs.values()], axis=0).astype(np.uint32)
    np.testing.assert_array_equal(server.result, expected)


def test_out_of_stage_calls_raise_and_change_nothing() -> None:
    _, clients, server = _setup()
    c = clients[10]
    with pytest.raises(ProtocolError, match="not allowed in stage advertise_keys"):
        c.unmask(UnmaskRequest(SID, 10, frozenset({10}), frozenset()))
    assert c.stage is ClientStage.ADVERTISE_KEYS
    adv = c.advertise_keys()
    with pytest.raises(ProtocolError, match="advertise_keys is not allowed in stage share_keys"):
        c.advertise_keys()
    server.receive(adv)
    with pytest.raises(ProtocolError, match="duplicate AdvertiseKeys from client 10"):
        server.receive(adv)
    with pytest.raises(ProtocolError, match="unknown client 99"):
        server.receive(dataclasses.replace(adv, sender=99))
    with pytest.raises(ProtocolError, match="session"):
        server.receive(dataclasses.replace(adv, session_id=bytes(16)))
    for u, other in clients.items():
        if u != 10:
            server.receive(other.advertise_keys())
    server.advance()
    with pytest.raises(ProtocolError, match="AdvertiseKeys from client 10 arrived in stage share"):
        server.receive(adv)  # replayed into the next stage
    assert server.stage is ServerStage.SHARE_KEYS


def test_tampered_rerouted_or_replayed_ciphertexts_are_rejected_without_state_change() -> None:
    cfg, clients, server = _setup()
    sb = {m.recipient: m for m in _to_masked(clients, server)}
    u = 13
    msg = sb[u]
    e = msg.shares[0]
    flipped = bytes([e.ciphertext[20] ^ 1])
    tampered = EncryptedShare(e.sender, e.receiver, e.ciphertext[:20] + flipped + e.ciphertext[21:])
    bad = ShareBroadcast(SID, u, (tampered, *msg.shares[1:]))
    with pytest.raises(CryptoError, match=f"from client {e.sender} to client {u}"):
        clients[u].masked_input(bad, _inputs(cfg)[u])
    assert clients[u].stage is ClientStage.MASKED_INPUT
    # A ciphertext meant for another client, relabelled, fails authentication too.
    other = sb[16].shares[0]
    moved = ShareBroadcast(SID, u, (EncryptedShare(other.sender, u, other.ciphertext),))
    with pytest.raises((CryptoError, ProtocolError)):
        clients[u].masked_input(moved, _inputs(cfg)[u])
    # A message from another session is refused before any decryption.
    with pytest.raises(ProtocolError, match="replayed"):
        clients[u].masked_input(dataclasses.replace(msg, session_id=bytes(16)), _inputs(cfg)[u])
    # The untouched message still works: state was left unchanged by the failures.
    out = clients[u].masked_input(msg, _inputs(cfg)[u])
    assert out.sender == u and clients[u].stage is ClientStage.UNMASKING


def test_crypto_binds_session_sender_and_receiver() -> None:
    a, b = crypto.KeyPair.generate(), crypto.KeyPair.generate()
    k = crypto.share_key(a, b.public, SID, 1, 2)
    assert k == crypto.share_key(b, a.public, SID, 2, 1)
    ct = crypto.encrypt_share(k, b"secret", SID, 1, 2)
    assert crypto.decrypt_share(k, ct, SID, 1, 2) == b"secret"
    for sid, s, r in [(bytes(16), 1, 2), (SID, 2, 1), (SID, 1, 3)]:
        with pytest.raises(CryptoError, match="failed authentication"):
            crypto.decrypt_share(k, ct, sid, s, r)
    with pytest.raises(CryptoError, match="key agreement"):
        crypto.mask_seed(a, bytes(32), SID, 1, 2)  # low-order point


def test_server_asking_for_both_share_kinds_gets_nothing() -> None:
    cfg, clients, server = _setup(n=5, t=3)
    xs = _inputs(cfg)
    sb = {m.recipient: m for m in _to_masked(clients, server)}
    c = clients[10]
    c.masked_input(sb[10], xs[10])
    everyone = frozenset(cfg.clients)
    greedy = UnmaskRequest(SID, 10, everyone, frozenset({13}))
    with pytest.raises(ProtocolError, match=r"both .* clients \[13\]"):
        c.unmask(greedy)
    assert c.stage is ClientStage.UNMASKING
    with pytest.raises(ProtocolError, match="too few"):
        c.unmask(UnmaskRequest(SID, 10, frozenset({10, 13}), everyone - {10, 13}))
    resp = c.unmask(UnmaskRequest(SID, 10, everyone - {13}, frozenset({13})))
    assert [v for v, _ in resp.s_shares] == [13]
    assert 13 not in [v for v, _ in resp.b_shares]
    # One answer per round: a second request (e.g. for 13's b-share) is refused.
    with pytest.raises(ProtocolError, match="stage done"):
        c.unmask(UnmaskRequest(SID, 10, everyone, frozenset()))


def test_fewer_than_t_survivors_fails_cleanly() -> None:
    cfg, clients, server = _setup(n=5, t=4)
    xs = _inputs(cfg)
    sb = {m.recipient: m for m in _to_masked(clients, server)}
    for u in (10, 13, 16):  # 3 < t = 4 masked inputs
        server.receive(clients[u].masked_input(sb[u], xs[u]))
    with pytest.raises(RoundFailed, match="only 3 masked inputs"):
        server.advance()
    assert server.stage is ServerStage.FAILED
    with pytest.raises(ProtocolError, match="no sum"):
        _ = server.result
    with pytest.raises(ProtocolError, match="stage failed"):
        server.receive(clients[19].masked_input(sb[19], xs[19]))


def test_single_masked_input_is_indistinguishable_from_uniform() -> None:
    # Chi-square on the top byte of one client's masked vector whose input is all zeros.
    # H0: uniform over 256 bins; significance alpha = 1e-3 (deterministic: seeded entropy).
    n_el = 1 << 16
    cfg = SecAggConfig.secagg([1, 2], n_el, 2, session_id=SID)
    clients = {u: SecAggClient(u, cfg, random.Random(100 + u).randbytes) for u in (1, 2)}
    server = SecAggServer(cfg)
    sb = {m.recipient: m for m in _to_masked(clients, server)}
    y = clients[1].masked_input(sb[1], np.zeros(n_el, dtype=np.uint32)).masked
    counts = np.bincount((y >> 24).astype(np.int64), minlength=256)
    stat, p = stats.chisquare(counts)
    assert p > 1e-3, (stat, p)
    # Sanity: the same test does reject a visibly non-uniform vector.
    skew = np.bincount(((y >> 24) & 0xFE).astype(np.int64), minlength=256)
    assert stats.chisquare(skew)[1] < 1e-3


def test_inconsistent_shares_fail_the_round() -> None:
    cfg, clients, server = _setup(n=4, t=3)
    xs = _inputs(cfg)
    sb = {m.recipient: m for m in _to_masked(clients, server)}
    for u in (10, 13, 16):  # 19 drops: its mask key must be reconstructed
        server.receive(clients[u].masked_input(sb[u], xs[u]))
    for r in _only(server.advance(), UnmaskRequest):
        resp = clients[r.recipient].unmask(r)
        if r.recipient == 10:  # a lying client corrupts its share of 19's key
            v, data = resp.s_shares[0]
            resp = dataclasses.replace(resp, s_shares=((v, bytes(16) + data[16:]),))
        server.receive(resp)
    with pytest.raises(RoundFailed, match="inconsistent shares"):
        server.advance()
