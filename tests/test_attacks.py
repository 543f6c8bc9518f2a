"""Issue 12, point 7: what attacking a running server found, each with the bounded quantity
measured (entries kept, key recoveries done, log lines written), never a duration."""

from __future__ import annotations

import json

from twisted.internet.task import Clock

from circles.api import Gateway
from circles.config import Config
from circles.scripts import NoScriptBackend

from .inmemory import fired
from .play_client import new_key, pk

CIRCLE = pk(new_key())


def _session(clock=None, **config):
    clock = clock if clock is not None else Clock()
    gateway = Gateway(Config(**config), clock, NoScriptBackend())
    return gateway, gateway.new_session(CIRCLE, connection_id=1)


def _send(session, message):
    text = fired(session.handle(json.dumps(message).encode("utf-8")))
    return None if text is None else json.loads(text)


def _request_series(gateway) -> list:
    return [line for line in gateway.metrics.exposition().decode().splitlines()
            if line.startswith("circles_requests_total{")]


# --- unknown method names do not stay in memory ----------------------------------------------------


def test_distinct_unknown_methods_keep_no_memory():
    gateway, session = _session(rate_limit=0)
    for i in range(300):
        name = f"no-such-method-{i}-" + "x" * 10_000
        assert _send(session, {"jsonrpc": "2.0", "method": name, "id": i})["error"]["code"] == -32601
        assert _send(session, {"jsonrpc": "2.0", "method": name + "-notification"}) is None
    # One series (and one cached child) for all of them: the label "unknown" with -32601.
    assert len(gateway.metrics._request_children) == 1
    [series] = _request_series(gateway)
    assert 'method="unknown"' in series and series.endswith(" 600.0")


def test_key_normalisation_cache_keeps_no_invalid_keys():
    """The LRU behind normalize_pubkey holds only valid keys (at most 132 characters each),
    however many huge or malformed ones an attacker sends."""
    from circles.keys import InvalidKey, _normalize, normalize_pubkey

    before = _normalize.cache_info().currsize
    for i in range(500):
        for text in (f"{i:x}" * 50_000, "02" + "00" * 32 + f"{i:x}", "zz" * 33, "02" + "00" * 32):
            try:
                normalize_pubkey(text)
            except InvalidKey:
                pass
    assert _normalize.cache_info().currsize == before
    assert _normalize.cache_info().maxsize == 4096


# --- a failed authenticate costs one signature check -----------------------------------------------


def test_failed_authenticate_costs_one_key_recovery_with_16_live_nonces(monkeypatch):
    import circles.auth

    from .support import Key

    gateway, session = _session(rate_limit=0)
    user, stranger = Key(), Key()
    nonces = [_send(session, {"jsonrpc": "2.0", "method": "fetch_nonce", "params": [user.pubkey], "id": i})
              ["result"]["nonce"] for i in range(16)]
    recoveries = []
    original = circles.auth.recover_eth_signer
    monkeypatch.setattr(circles.auth, "recover_eth_signer", lambda *a: recoveries.append(1) or original(*a))
    bad = {"pubkey": user.pubkey, "signature": stranger.eth_sign(nonces[0])}
    for _ in range(10):
        reply = _send(session, {"jsonrpc": "2.0", "method": "authenticate", "params": bad, "id": 1})
        assert reply["error"]["code"] == -32002
    assert len(recoveries) == 10
    # Naming the nonce (an older one) works, at the same cost.
    good = {"pubkey": user.pubkey, "signature": user.eth_sign(nonces[2]), "nonce": nonces[2]}
    assert _send(session, {"jsonrpc": "2.0", "method": "authenticate", "params": good, "id": 2})["result"]["authenticated"]
    assert len(recoveries) == 11


# --- anomalies cannot flood the log, however many connections make them ---------------------------


def _info_lines(events) -> list:
    return [e for e in events if e.get("log_level") is not None and e["log_level"].name != "debug"]


def test_failed_authentications_on_many_connections_write_a_bounded_log():
    from .inmemory import captured_log
    from .support import Key

    clock = Clock()
    gateway = Gateway(Config(rate_limit=0), clock, NoScriptBackend())
    user = Key()
    with captured_log() as events:
        for conn in range(200):  # connections from two addresses, each failing 5 times
            session = gateway.new_session(CIRCLE, connection_id=conn, peer=f"198.51.100.{conn % 2}")
            nonce = _send(session, {"jsonrpc": "2.0", "method": "fetch_nonce", "params": [user.pubkey], "id": 0})
            bad = {"pubkey": user.pubkey, "signature": Key().eth_sign(nonce["result"]["nonce"])}
            for i in range(5):
                assert _send(session, {"jsonrpc": "2.0", "method": "authenticate", "params": bad, "id": i})["error"]
            session.anomalies.closed()
        assert len(_info_lines(events)) == 50  # the minute's budget
        clock.advance(60)
    lines = _info_lines(events)
    assert len(lines) == 51
    summary = lines[-1]
    # Each connection hands the budget its first 3 failures and, at close, one line for the
    # other 2: 800 lines asked for, 50 written, 750 summed up.
    assert summary["unlogged"] == 750
    assert summary["by_kind"] == {"authentication failed": 562, "connection summary": 188}  # 12 connections logged whole
    assert summary["busiest"] == {"198.51.100.0": 374, "198.51.100.1": 376}  # the 13th, from .0, half logged
    assert lines[0]["conn"] == 0 and lines[0]["peer"] == "198.51.100.0"
