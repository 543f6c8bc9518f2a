"""What attacking a running server found, each with the bounded quantity
measured (entries kept, key recoveries done, log lines written), never a duration.

Here a gateway in memory; a real server, Redis and worker in tests/integration/test_attacks.py."""

from __future__ import annotations

import json

from twisted.internet.task import Clock

from circles.server.config import Config
from circles.server.gateway import Gateway

from ..inmemory import NoScriptBackend, fired, open_session, replied
from ..play_client import new_key, pk

CIRCLE = pk(new_key())


def _session(clock=None, **config):
    clock = clock if clock is not None else Clock()
    gateway = Gateway(Config(**config), clock, NoScriptBackend())
    return gateway, open_session(gateway, CIRCLE, connection_id=1)


def _send(session, message):
    text = replied(session.answer(json.dumps(message).encode("utf-8")))
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
    assert len(gateway.metrics._requests._counts) == 1
    [series] = _request_series(gateway)
    assert 'method="unknown"' in series and series.endswith(" 600.0")


def test_key_normalisation_cache_keeps_no_invalid_keys():
    """The LRU behind normalize_pubkey holds only valid keys (at most 132 characters each),
    however many huge or malformed ones an attacker sends."""
    from circles.common.keys import InvalidKey, _normalize, normalize_pubkey

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
    import circles.common.signatures

    from ..support import Key

    gateway, session = _session(rate_limit=0)
    user, stranger = Key(), Key()
    nonces = [_send(session, {"jsonrpc": "2.0", "method": "fetch_nonce", "params": [user.pubkey], "id": i})
              ["result"]["nonce"] for i in range(16)]
    recoveries = []
    original = circles.common.signatures.recover_eth_signer
    monkeypatch.setattr(circles.common.signatures, "recover_eth_signer", lambda *a: recoveries.append(1) or original(*a))
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
    from ..inmemory import captured_log
    from ..support import Key

    clock = Clock()
    gateway = Gateway(Config(rate_limit=0), clock, NoScriptBackend())
    user = Key()
    with captured_log() as events:
        for conn in range(200):  # connections from two addresses, each failing 5 times
            session = open_session(gateway, CIRCLE, connection_id=conn, peer=f"198.51.100.{conn % 2}")
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


# --- plays waiting per connection are bounded, and die with the connection -------------------------


def _runner_session(**config):
    from twisted.internet.defer import Deferred
    from zope.interface import implementer

    from circles.backend.scripts import IScriptRunner

    @implementer(IScriptRunner)
    class Runner:
        def __init__(self):
            self.pending = []
            self.cancelled = 0

        def run(self, request):
            d = Deferred(lambda _: setattr(self, "cancelled", self.cancelled + 1))
            self.pending.append(d)
            return d

    runner = Runner()
    gateway = Gateway(Config(**config), Clock(), runner)
    return gateway, open_session(gateway, CIRCLE, connection_id=1), runner


def _play(session, id_=None):
    message = {"jsonrpc": "2.0", "method": "play", "params": {"script": "x"}}
    if id_ is not None:
        message["id"] = id_
    return session.answer(json.dumps(message).encode("utf-8"))


def test_plays_waiting_on_one_connection_are_capped():
    gateway, session, runner = _runner_session(rate_limit=0, max_plays=3)
    waiting = [_play(session), _play(session), _play(session, 3)]  # notifications count too
    assert len(runner.pending) == 3 and len(session.plays) == 3
    refused = json.loads(_play(session, 4))
    assert refused["error"] == {"code": -32006, "message": "Too many requests: 3 plays already wait on this connection",
                                "data": {"max_plays": 3}}
    assert _play(session) is None  # a notification over the cap is dropped, not queued
    assert len(runner.pending) == 3
    runner.pending[2].callback("done")  # one answered: room for one more
    assert json.loads(fired(waiting[2]))["result"] == {"output": "done"}
    assert len(session.plays) == 2
    _play(session, 5)
    assert len(runner.pending) == 4 and len(session.plays) == 3


def test_closing_a_connection_cancels_its_plays_without_a_reply_or_a_traceback():
    from ..inmemory import captured_log

    gateway, session, runner = _runner_session(rate_limit=0)
    replies = [_play(session, i) for i in range(5)] + [_play(session)]
    batch = session.answer(json.dumps([{"jsonrpc": "2.0", "method": "play", "params": ["y"], "id": "b"}]))
    with captured_log() as events:
        session.close()
    assert runner.cancelled == 7 and not session.plays
    assert [fired(reply) for reply in replies] == [None] * 6  # nothing to send: nobody is there
    assert fired(batch) is None and session.in_flight == 0
    assert not [e for e in events if e.get("log_failure") is not None]
    # Counted as cancelled; the play-time histogram only sees plays that were answered.
    assert 'circles_requests_total{method="play",outcome="cancelled"} 7.0' in _request_series(gateway)
    assert "circles_play_seconds_count 0.0" in gateway.metrics.exposition().decode()


# --- the nesting check is linear, whatever the strings look like -----------------------------------

#: Texts past the cheap bracket count whose strings do not close (invalid JSON, as an attacker
#: sends it): an unterminated string of escaped quotes, of escaped backslashes and quotes, one
#: ending in a lone backslash.
_UNTERMINATED = ['[' * 300 + '"' + '\\"' * 1000, '[' * 300 + ('"' + '\\' * 3) * 1000,
                 '{' * 300 + '"a\\' * 1000, '[' * 300 + '"' + '\\' * 1001]


def test_a_string_match_starting_at_any_quote_never_fails():
    """The depth check strips strings with one regex pass. A match that could fail after
    scanning to the end of the text would be tried again from the next quote: quadratic work, a
    1 MiB message holding the CPU for hours. So from every quote the pattern matches."""
    from circles.common.fast_json import _STRING

    for text in _UNTERMINATED:
        quotes = [i for i, c in enumerate(text) if c == '"']
        assert quotes and all(_STRING.match(text, i) for i in quotes)
