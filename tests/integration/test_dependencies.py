"""The dependencies circles leans on, checked where it leans: each assumption it makes about a
library's internals (a private attribute, a name replaced at run time, the source of a method
overridden or relied on) against the installed version, and the pins in pyproject.toml that
keep that version in the line reviewed. An upgrade that changes any of it fails here first.

Elsewhere: Twisted's ``tcp.Server`` internals (``tests/unit/test_eager.py``) and Autobahn's
(``tests/unit/test_protocol.py``).

When a digest here fails: read the library's new source against the module named beside it,
carry over what matters, and record the new digest.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from importlib.metadata import requires, version

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel

from circles.backend import txredisapi_patches
from circles.backend.redis import connect
from circles.backend.redis_url import parse_redis_url
from circles.common import logs
from circles.server.tls import endpoint_parameters

from ..inmemory import captured_log
from ..play_client import eventually
from ..support import source_digest, tls_pair


@contextmanager
def debug_log():
    """Every event logged at debug and above, collected (the level is info again after)."""
    logs.set_level("debug")
    try:
        with captured_log() as events:
            yield events
    finally:
        logs.set_level("info")


def _pin(name: str) -> str:
    return next(r for r in requires("circles-gateway") if r.split("[")[0].split("<")[0].split(">")[0] == name)


# --- txredisapi: circles/backend/txredisapi_patches.py ------------------------------------------

#: The txredisapi code circles/backend/txredisapi_patches.py relies on, as reviewed for 1.6.
TXREDISAPI_SOURCES = {
    # authenticates with self.password unless None, selects the database, then makes it ready:
    # CheckedProtocol authenticates first and sets the password aside for it.
    ("BaseRedisProtocol", "connectionMade"): "6c94381d54a9a2f9",
    # builds each pooled connection's ClientService from the module's name, at call time.
    ("_PoolSlot", "__init__"): "f740a4689050c1ce",
    # the pool: what live_connection and drop_connections read.
    ("RedisFactory", "addConnection"): "1086e8b55a354741",
    ("RedisFactory", "delConnection"): "2e94b188bc80b254",
    # peek: wait for a connection without taking it (the dispatcher's and the commands' readiness).
    ("RedisFactory", "getConnection"): "a0dd1ab1777b1b79",
    # sets each protocol's factory: Subscriber reaches its factory's on_message through it.
    ("RedisFactory", "buildProtocol"): "0b0068a2927ac69f",
    # pmessage replies to messageReceived, others (a PING's while subscribed) to the command waiting.
    ("SubscriberProtocol", "replyReceived"): "c5c770fea9980a47",
    # what eval_script calls as txredisapi's eval did: EVALSHA (adding the digest to
    # script_hashes once it worked), EVAL to load a script, and EVAL again after a NOSCRIPT.
    ("BaseRedisProtocol", "evalsha"): "bd30e96e91d3e1d3",
    ("BaseRedisProtocol", "_eval"): "9d5948afc2fa0ca7",
    ("BaseRedisProtocol", "_eval_success"): "c6a8a611b436a906",
    ("BaseRedisProtocol", "_evalsha_failed"): "3e9fcb5d0af5ba6d",
    ("BaseRedisProtocol", "_evalsha_errback"): "fc5c6010963c4d86",
    # a command's Deferred, with its reply timeout unless apply_timeout=False (EagerProtocol puts
    # it in a lane instead, doing what fire_timeout does); connectionLost fails the commands waiting.
    ("BaseRedisProtocol", "execute_command"): "835c592bd9402e99",
    ("BaseRedisProtocol", "connectionLost"): "c6ad321624dac656",
}


@pytest.mark.parametrize("owner, method", sorted(TXREDISAPI_SOURCES))
def test_the_txredisapi_code_relied_on_is_the_one_reviewed(owner, method):
    import txredisapi

    assert source_digest(vars(getattr(txredisapi, owner))[method]) == TXREDISAPI_SOURCES[owner, method]


def test_the_command_builder_replaced_is_the_one_reviewed():
    import txredisapi

    from circles.backend import txredisapi_patches

    # txredisapi's own _build_command and the _encode_value ours falls back to, as reviewed.
    assert source_digest(txredisapi_patches.txredisapis_build_command) == "d2f6abc184c6abb9"
    assert source_digest(vars(txredisapi.BaseRedisProtocol)["_encode_value"]) == "8ed2e1648fce8ff2"
    assert txredisapi.BaseRedisProtocol._build_command is txredisapi_patches.build_command


ARGUMENT = st.one_of(st.text(), st.binary(), st.integers(), st.booleans(), st.floats(), st.none(),
                     st.binary().map(bytearray))


@settings(max_examples=500, deadline=None)
@given(args=st.lists(ARGUMENT, max_size=40), charset=st.sampled_from(["utf-8", "latin-1", None]))
def test_commands_are_built_byte_for_byte_as_txredisapi_builds_them(args, charset):
    import txredisapi

    from circles.backend.txredisapi_patches import build_command, txredisapis_build_command

    protocol = txredisapi.RedisProtocol(charset=charset)

    def built(builder):
        try:
            return builder(protocol, *args)
        except txredisapi.InvalidData as e:  # text the charset cannot encode: the same error
            return ("InvalidData", str(e))

    assert built(build_command) == built(txredisapis_build_command)


#: What our connections send most: keys, ids, scripts and numbers of arguments.
PACKED = st.one_of(st.text(), st.binary(), st.integers(), st.text(alphabet=st.characters(codec="utf-8")))


@settings(max_examples=500, deadline=None)
@given(args=st.lists(PACKED, max_size=40))
def test_commands_packed_by_hiredis_are_the_bytes_txredisapi_builds(args):
    # The other test mixes in a float or a bool, which keeps most commands out of hiredis's
    # pack_command: these are the ones it packs (text of any code point, lone surrogates too).
    import txredisapi

    from circles.backend.txredisapi_patches import build_command, txredisapis_build_command

    protocol = txredisapi.RedisProtocol(charset="utf-8")

    def built(builder):
        try:
            return builder(protocol, *args)
        except txredisapi.InvalidData as e:
            return ("InvalidData", str(e))

    assert built(build_command) == built(txredisapis_build_command)


def test_the_reply_converter_replaced_is_the_one_reviewed():
    import txredisapi

    from circles.backend import txredisapi_patches

    assert source_digest(txredisapi_patches.txredisapis_try_convert_data) == "e1f2ed24e0e84206"
    assert txredisapi.BaseRedisProtocol.tryConvertData is txredisapi_patches.convert_reply


REPLY = st.recursive(st.one_of(st.binary(), st.text().map(lambda t: t.encode("utf-8", "surrogatepass")), st.text(),
                               st.integers(), st.floats(allow_nan=False), st.none()),
                     lambda items: st.lists(items, max_size=8), max_leaves=40)


@settings(max_examples=500, deadline=None)
@given(reply=REPLY, charset=st.sampled_from(["utf-8", "latin-1", None]), numbers=st.booleans())
def test_replies_are_converted_as_txredisapi_converts_them(reply, charset, numbers):
    import txredisapi

    from circles.backend.txredisapi_patches import convert_reply, txredisapis_try_convert_data

    protocol = txredisapi.RedisProtocol(charset=charset, convertNumbers=numbers)
    ours, theirs = convert_reply(protocol, reply), txredisapis_try_convert_data(protocol, reply)
    assert ours == theirs and repr(ours) == repr(theirs)  # the same values, of the same types


def test_pyproject_pins_the_txredisapi_line_that_was_reviewed():
    pin = _pin("txredisapi")
    assert ">=1.6" in pin and "<1.7" in pin, pin
    assert version("txredisapi").startswith("1.6."), version("txredisapi")


def test_txredisapi_finds_our_client_service_and_log_by_name():
    import txredisapi

    assert txredisapi.ClientService is txredisapi_patches.QuietClientService
    with debug_log() as events:
        txredisapi.log.msg("Discarding dead connection.")
    [event] = [e for e in events if e.get("message") == "Discarding dead connection."]
    assert event["log_level"] == LogLevel.debug and event["log_namespace"] == "txredisapi"


def test_each_pooled_connection_reconnects_through_our_client_service():
    import txredisapi
    from twisted.internet.interfaces import IStreamClientEndpoint
    from zope.interface import implementer

    @implementer(IStreamClientEndpoint)
    class Never:
        def connect(self, factory):
            return Deferred()  # an attempt under way for as long as the test

    factory = txredisapi.RedisFactory(None, None, 2, isLazy=True)
    factory.startConnecting(Never())
    try:
        assert len(factory.slots) == 2
        assert all(type(slot.service) is txredisapi_patches.QuietClientService for slot in factory.slots)
    finally:
        factory.disconnect()


def test_twisted_client_service_logs_its_retries_through_its_log_attribute():
    """``ClientService._log`` (private to Twisted) is what its reconnection messages go through:
    ours says them at debug."""
    from twisted.application.internet import ClientService
    from twisted.internet.defer import fail
    from twisted.internet.interfaces import IStreamClientEndpoint
    from twisted.internet.protocol import Factory
    from twisted.logger import Logger
    from zope.interface import implementer

    assert isinstance(vars(ClientService)["_log"], Logger)

    @implementer(IStreamClientEndpoint)
    class Refusing:
        def connect(self, factory):
            return fail(ConnectionRefusedError())

    clock = Clock()
    service = txredisapi_patches.QuietClientService(Refusing(), Factory(), retryPolicy=lambda attempt: 1.0,
                                                    clock=clock)
    with debug_log() as events:
        service.startService()
        clock.advance(1.0)
        service.stopService()
    retries = [e for e in events if "Scheduling retry" in (e.get("log_format") or "")]
    assert len(retries) == 2 and {e["log_level"] for e in retries} == {LogLevel.debug}


@pytest_twisted.ensureDeferred
async def test_a_pool_holds_its_live_connections_and_each_dropped_one_comes_back(redis_server):
    """What live_connection and drop_connections rely on: ``RedisFactory.pool`` holds the
    connections up, each with ``connected`` and its ``transport``; one closed reconnects."""
    factory = connect(parse_redis_url(redis_server.url), reactor, poolsize=2)
    try:
        await eventually(lambda: factory.size == 2)
        connection = txredisapi_patches.live_connection(factory)
        assert connection in factory.pool and connection.connected
        assert await connection.execute_command("PING") == "PONG"
        before = list(factory.pool)
        txredisapi_patches.drop_connections(factory)
        await eventually(lambda: factory.size == 2 and not set(factory.pool) & set(before))
        assert all(not c.connected for c in before)
        txredisapi_patches.drop_connections(None)  # no factory: nothing to do
    finally:
        await factory.disconnect()
    assert txredisapi_patches.live_connection(factory) is None


def test_the_eval_replaced_is_the_one_reviewed():
    import txredisapi

    assert source_digest(txredisapi_patches.txredisapis_eval) == "14a8f1ba9e2ced7d"
    assert txredisapi.BaseRedisProtocol.eval is txredisapi_patches.eval_script


@pytest_twisted.ensureDeferred
async def test_eval_loads_a_script_once_runs_it_by_digest_and_loads_it_again_when_redis_lost_it(redis_server):
    """eval_script as txredisapi's eval: EVAL the first time, EVALSHA after, EVAL again after a
    SCRIPT FLUSH (NOSCRIPT); the digest is Redis's own (SCRIPT LOAD's), from text or bytes."""
    import txredisapi

    factory = connect(parse_redis_url(redis_server.url), reactor, poolsize=1)
    script = "return {KEYS[1], ARGV[1], 'é'}"
    try:
        await eventually(lambda: factory.size == 1)
        connection = txredisapi_patches.live_connection(factory)
        data, digest = txredisapi_patches.script_digest(script)
        assert data == script.encode() and digest == await connection.execute_command("SCRIPT", "LOAD", script)
        await connection.execute_command("SCRIPT", "FLUSH")
        calls = await connection.execute_command("CONFIG", "RESETSTAT")

        async def stats() -> dict:
            info = await connection.execute_command("INFO", "commandstats")
            return {name: int(re.search(r"calls=(\d+)", line).group(1)) for name, line in
                    (row.split(":", 1) for row in info.splitlines() if row.startswith("cmdstat_"))}

        assert await connection.eval(script, ["k"], ["a"]) == ["k", "a", "é"]
        assert digest in connection.script_hashes
        assert await connection.eval(script.encode(), ["k2"], [7]) == ["k2", "7", "é"]  # bytes: the same script
        assert await connection.eval(bytearray(script.encode()), ["k3"], ["c"]) == ["k3", "c", "é"]
        counted = await stats()
        assert counted.get("cmdstat_eval") == 1 and counted.get("cmdstat_evalsha") == 2, counted
        await connection.execute_command("SCRIPT", "FLUSH")
        assert await connection.eval(script, ["k4"], ["d"]) == ["k4", "d", "é"]  # NOSCRIPT, then EVAL
        counted = await stats()
        assert counted.get("cmdstat_eval") == 2 and counted.get("cmdstat_evalsha") == 3, counted
        with pytest.raises(txredisapi.ResponseError):
            await connection.eval("return redis.call('NOSUCHCOMMAND')")
        assert calls == "OK"
    finally:
        await factory.disconnect()


# --- Twisted ------------------------------------------------------------------------------------

#: Twisted's ClientService passes its _log to the machine that logs its retries
#: (circles/backend/txredisapi_patches.py).
def test_the_twisted_client_service_code_relied_on_is_the_one_reviewed():
    from twisted.application.internet import ClientService

    assert source_digest(ClientService.__init__) == "44a81454f23af819"


#: The HTTPChannel and LineReceiver code whose private state RequestDeadlineChannel reads or
#: replaces, the Request methods BoundedRequest overrides and the chunked decoder it counts
#: (circles/server/http/request_limits.py).
TWISTED_WEB_SOURCES = {
    ("HTTPChannel", "__init__"): "3c799fc1cbf9818b",  # _handlingRequest, _dataBuffer
    ("HTTPChannel", "connectionMade"): "95b71a1bc3abb905",  # _networkProducer
    ("HTTPChannel", "lineReceived"): "b77ec6f21116e827",
    ("HTTPChannel", "allHeadersReceived"): "979a9a8410f41ad9",  # gotLength, then Expect: 100-continue
    ("HTTPChannel", "allContentReceived"): "9f7c990696871a92",
    ("HTTPChannel", "dataReceived"): "152316e9ce502109",  # pipelined bytes into _dataBuffer
    ("HTTPChannel", "requestDone"): "a75a186c66f7d38d",  # _waitingForTransport, the replay of _dataBuffer
    ("HTTPChannel", "pauseProducing"): "8fe306cf284ba8e7",
    ("HTTPChannel", "resumeProducing"): "561ac237d3468e84",
    ("HTTPChannel", "timeoutConnection"): "f08552855cd242e0",
    ("HTTPChannel", "loseConnection"): "ad10d919b228424b",  # replaced: _networkProducer off, then the close in order
    ("HTTPChannel", "_respondToBadRequestAndDisconnect"): "c7ccc0f4450a7d6b",  # replaced: the same, with a reason
    ("LineReceiver", "dataReceived"): "6f773dd6b423a279",  # _buffer, _busyReceiving, line_mode, rawDataReceived
    # the decoder is chosen as the header comes, before gotLength (where CountedChunks replaces it)
    ("HTTPChannel", "_maybeChooseTransferDecoder"): "3b92d266a3c7bd2c",
    ("_ChunkedTransferDecoder", "__init__"): "33d2107fa07649a2",  # dataCallback, finishCallback, _buffer
    ("_ChunkedTransferDecoder", "_dataReceived_CHUNK_LENGTH"): "b8f33f5942b1075f",  # True: a size read, state BODY
    ("_ChunkedTransferDecoder", "dataReceived"): "5a1ed98161d9d8f9",  # loops while _buffer holds bytes
}


@pytest.mark.parametrize("owner, method", sorted(TWISTED_WEB_SOURCES))
def test_the_twisted_web_code_request_limits_relies_on_is_the_one_reviewed(owner, method):
    from twisted.protocols.basic import LineReceiver
    from twisted.web.http import HTTPChannel, _ChunkedTransferDecoder

    owners = {"HTTPChannel": HTTPChannel, "LineReceiver": LineReceiver, "_ChunkedTransferDecoder": _ChunkedTransferDecoder}
    assert source_digest(vars(owners[owner])[method]) == TWISTED_WEB_SOURCES[owner, method]


#: The reactor loop circles.common.event_loop replaces (EPollReactor.doPoll, whose loop it
#: repeats without callWithLogger), what it calls in its place, where the reactor calls it
#: (mainLoop: self.doIteration, looked up at each turn) and what keeps a legacy event's
#: ``system``: callWithLogger's prefix and its handling of errors, the root context every
#: thread's tracker starts from, and the copy of it every legacy event and context starts from.
#: Then what its TurnEnd clock serves in Twisted's TLS: the factory's ``clock`` handed to each
#: connection's aggregator, which calls ``callLater(0)`` and only ``cancel``s what it gets.
TWISTED_LOOP_SOURCES = {
    ("epollreactor", "EPollReactor.doPoll"): "09b62ae68ef01b4b",  # replaced
    ("posixbase", "_PollLikeMixin._doReadOrWrite"): "5ffee55b79492b00",
    ("base", "ReactorBase.mainLoop"): "769125a86d0cd7e9",
    ("log", "callWithLogger"): "802f8564bca3531f",
    ("log", "callWithContext"): "c44b5124f288e82f",
    ("log", "LogPublisher.msg"): "6750a61e2bd3df23",
    ("context", "ContextTracker.__init__"): "578c556c8bd47a43",
    ("tls", "TLSMemoryBIOFactory.__init__"): "b703d9989165fa86",
    ("tls", "BufferingTLSTransport.__init__"): "2d7152b65488afb9",
    ("tls", "_AggregateSmallWrites.write"): "6353c884a8ca58c5",
    ("tls", "_AggregateSmallWrites._scheduledFlush"): "7ac107fe663decc3",
    ("tls", "_AggregateSmallWrites.close"): "05d8af686a9e5f85",
}


@pytest.mark.parametrize("module, name", sorted(TWISTED_LOOP_SOURCES))
def test_the_twisted_loop_code_event_loop_replaces_is_the_one_reviewed(module, name):
    from twisted.internet import base, epollreactor, posixbase
    from twisted.protocols import tls
    from twisted.python import context, log

    owner = {"epollreactor": epollreactor, "posixbase": posixbase, "base": base, "log": log, "context": context,
             "tls": tls}[module]
    *outer, last = name.split(".")
    for part in outer:
        owner = getattr(owner, part)
    assert source_digest(vars(owner)[last]) == TWISTED_LOOP_SOURCES[module, name]


#: twisted.python.usage: the option parsers map each option to its handler in Options._dispatch,
#: and a typed option's handler is a CoerceParameter whose dispatch parseOptions calls
#: (circles/common/options.py names the option in its message).
TWISTED_USAGE_SOURCES = {
    ("Options", "__init__"): "e6f34f954c58e801",
    ("Options", "parseOptions"): "2b4f644ef29453d8",
    ("CoerceParameter", "dispatch"): "d2f2f503a85e67be",
}


@pytest.mark.parametrize("owner, method", sorted(TWISTED_USAGE_SOURCES))
def test_the_twisted_usage_code_options_relies_on_is_the_one_reviewed(owner, method):
    from twisted.python import usage

    assert source_digest(vars(getattr(usage, owner))[method]) == TWISTED_USAGE_SOURCES[owner, method]


# --- pyOpenSSL: circles/server/tls.py release_buffers ------------------------------------------

#: The pyOpenSSL code release_buffers relies on, as reviewed for 26.4: a Connection made without
#: a socket speaks through two memory BIOs set on its SSL (``_into_ssl``, ``_from_ssl``, ``_ssl``),
#: which its BIO methods read each time (nothing else keeps them); and Twisted's TLS hands out that
#: Connection (``getHandle``). The server's TLS transport (``_TLSTransport``) reads the length of
#: ``_from_ssl`` where ``bio_read`` would raise WantReadError (``_handle_bio_errors``) on an empty one.
PYOPENSSL_SOURCES = {
    ("Connection", "__init__"): "3161e88318ab2413",
    ("Connection", "bio_read"): "bc83763ed40fc664",
    ("Connection", "_handle_bio_errors"): "eaea77f2e1fab12e",
    ("Connection", "bio_write"): "2198d63b78ada6dc",
    ("Connection", "bio_shutdown"): "5989bd920a4dd852",
}


@pytest.mark.parametrize("owner, method", sorted(PYOPENSSL_SOURCES))
def test_the_pyopenssl_code_relied_on_is_the_one_reviewed(owner, method):
    from OpenSSL import SSL

    assert source_digest(vars(getattr(SSL, owner))[method]) == PYOPENSSL_SOURCES[owner, method]


def test_twisted_tls_hands_out_its_pyopenssl_connection():
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    assert source_digest(vars(TLSMemoryBIOProtocol)["getHandle"]) == "5c7a1b12501164b3"


def test_the_outgoing_bio_is_empty_exactly_when_twisted_would_find_nothing_to_send():
    """What ``_TLSTransport._flushSendBIO`` skips is what Twisted's would do nothing with: over a
    real handshake and a record each way, the server's outgoing BIO reads as empty exactly when
    ``bio_read`` raises WantReadError, and otherwise holds what ``bio_read`` gives. Twisted's
    ``_flushSendBIO`` is the one reviewed (it reads the BIO and writes what it got, nothing else)."""
    import trustme
    from OpenSSL import SSL
    from OpenSSL._util import ffi, lib
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    assert source_digest(vars(TLSMemoryBIOProtocol)["_flushSendBIO"]) == "c034168e4f0faf2c"
    ca = trustme.CA()
    server_context, client_context = SSL.Context(SSL.TLS_METHOD), SSL.Context(SSL.TLS_METHOD)
    ca.issue_cert("localhost").configure_cert(server_context)
    seen = {"empty": 0, "full": 0}

    def drain(sender, receiver) -> None:
        while True:
            pending = lib.BIO_get_mem_data(sender._from_ssl, ffi.NULL)
            try:
                data = sender.bio_read(2 ** 15)
            except SSL.WantReadError:
                assert pending == 0
                seen["empty"] += 1
                return
            assert pending > 0 and len(data) == min(pending, 2 ** 15)
            seen["full"] += 1
            receiver.bio_write(data)

    server, client = tls_pair(server_context, client_context, carry=drain)
    client.send(b"ping")
    drain(client, server)
    assert server.recv(100) == b"ping"
    server.send(b"pong")
    drain(server, client)
    assert client.recv(100) == b"pong"
    assert seen["empty"] >= 4 and seen["full"] >= 4


#: What ``circles.server.tls._Connection.recv`` stands on: pyOpenSSL's ``recv`` (``SSL_read`` into
#: a new buffer, its error raised) and ``bio_shutdown`` (the incoming BIO's EOF); Twisted's
#: ``_flushReceiveBIO``, which calls ``recv`` until WantReadError, ``dataReceived``, which calls it
#: only past the handshake, ``connectionLost``, which calls it after ``bio_shutdown``, and
#: ``_convertToAppropriateFactory``, which takes the connection from our creator's
#: ``serverConnectionForTLS``.
RECEIVE_SOURCES = {
    ("OpenSSL.SSL", "Connection", "recv"): "84b0e9671ae37797",
    ("OpenSSL.SSL", "Connection", "bio_shutdown"): "5989bd920a4dd852",
    ("twisted.protocols.tls", "TLSMemoryBIOProtocol", "_flushReceiveBIO"): "b45e129f60c44862",
    ("twisted.protocols.tls", "TLSMemoryBIOProtocol", "dataReceived"): "0c9326eac628dc89",
    ("twisted.protocols.tls", "TLSMemoryBIOProtocol", "connectionLost"): "db44a0b303d81d19",
    ("twisted.protocols.tls", None, "_convertToAppropriateFactory"): "4da2d8eafba84c67",
}


@pytest.mark.parametrize("module, owner, name", sorted(RECEIVE_SOURCES, key=str))
def test_the_receive_code_relied_on_is_the_one_reviewed(module, owner, name):
    import importlib

    where = importlib.import_module(module)
    where = where if owner is None else vars(where)[owner]
    assert source_digest(vars(where)[name]) == RECEIVE_SOURCES[module, owner, name]


@pytest.fixture(scope="module")
def tls_server_options():
    """Our server options (circles.server.tls) for a certificate made for the run."""
    import trustme
    from OpenSSL import crypto

    from circles.server.tls import server_options

    leaf = trustme.CA().issue_cert("localhost")
    return server_options(crypto.load_privatekey(crypto.FILETYPE_PEM, leaf.private_key_pem.bytes()),
                          crypto.load_certificate(crypto.FILETYPE_PEM, leaf.cert_chain_pems[0].bytes()))


def _our_pair(options):
    from OpenSSL import SSL

    from circles.server.tls import _ConnectionCreator

    server = _ConnectionCreator(options).serverConnectionForTLS(None)
    return tls_pair(None, SSL.Context(SSL.TLS_CLIENT_METHOD), server=server)


_STEPS = st.lists(st.one_of(
    st.tuples(st.just("send"), st.integers(1, 40_000)),  # the client writes: one or more records
    st.tuples(st.just("carry"), st.integers(1, 20_000)),  # that many ciphertext bytes reach the server
    st.tuples(st.just("read"), st.sampled_from([1, 100, 2 ** 15])),  # the server reads as Twisted does
), max_size=12)


@settings(max_examples=60, deadline=None)
@given(steps=_STEPS)
def test_the_server_connection_says_nothing_to_read_only_when_openssl_would(tls_server_options, steps):
    """``_Connection.recv`` raises WantReadError without asking OpenSSL when its BIO is empty and
    nothing decrypted waits. Over a real handshake, records written and carried in any sizes
    (partial records, several at once, a record read a byte at a time), whenever it does,
    pyOpenSSL's own ``recv`` says the same; and every byte sent is read, in order."""
    from OpenSSL import SSL

    server, client = _our_pair(tls_server_options)
    sent, got, ciphertext, shortcuts = bytearray(), bytearray(), bytearray(), 0

    def read(bufsiz: int) -> None:
        nonlocal shortcuts
        while True:
            try:
                got.extend(server.recv(bufsiz))
            except SSL.WantReadError:
                with pytest.raises(SSL.WantReadError):
                    SSL.Connection.recv(server, bufsiz)
                shortcuts += 1
                return

    for step, size in steps + [("carry", 10 ** 6), ("read", 2 ** 15)]:
        if step == "send":
            data = bytes([len(sent) % 251]) * size
            client.sendall(data)
            sent.extend(data)
        elif step == "carry":
            try:
                while True:
                    ciphertext.extend(client.bio_read(2 ** 16))
            except SSL.WantReadError:
                pass
            if ciphertext:
                server.bio_write(bytes(ciphertext[:size]))
                del ciphertext[:size]
        else:
            read(size)
    assert got == sent
    assert shortcuts >= 1


def test_the_server_connection_still_reports_how_the_stream_ended(tls_server_options):
    """The end of the stream is OpenSSL's to tell: the peer's close_notify (ZeroReturnError, which
    Twisted takes for a clean close) or the TCP connection lost without it (``bio_shutdown``, then
    pyOpenSSL's "Unexpected EOF"), even with nothing in the BIO."""
    from OpenSSL import SSL

    server, client = _our_pair(tls_server_options)
    with pytest.raises(SSL.WantReadError):
        server.recv(2 ** 15)
    client.shutdown()
    server.bio_write(client.bio_read(2 ** 16))
    with pytest.raises(SSL.ZeroReturnError):
        server.recv(2 ** 15)

    server, client = _our_pair(tls_server_options)
    client.send(b"last words")
    server.bio_write(client.bio_read(2 ** 16))
    server.bio_shutdown()
    assert server.recv(2 ** 15) == b"last words"
    with pytest.raises(SSL.SysCallError, match="Unexpected EOF"):
        server.recv(2 ** 15)


def test_pyproject_pins_the_pyopenssl_line_that_was_reviewed():
    pin = _pin("pyopenssl")
    assert ">=26.4" in pin and "<27" in pin, pin
    assert version("pyopenssl").startswith("26."), version("pyopenssl")


# An ssl: endpoint string is read here (circles/server/tls.py) as serverFromString reads it, so
# that the endpoint is built from options made here. Twisted's own reader is private: compared.
_ENDPOINT_TEXT = st.text(alphabet=st.sampled_from("ab=:\\/.1 "), max_size=20)  # ASCII, as names must be


@given(_ENDPOINT_TEXT)
def test_endpoint_strings_are_read_as_twisted_reads_them(description):
    from twisted.internet.endpoints import _parse

    try:
        expected = _parse(description)
    except RuntimeError:  # a trailing backslash: Twisted's reader runs out
        with pytest.raises(ValueError):
            endpoint_parameters(description)
        return
    assert endpoint_parameters(description) == (list(expected[0]), dict(expected[1]))


def test_an_endpoint_string_ending_in_a_lone_backslash_is_a_value_error():
    with pytest.raises(ValueError, match="backslash"):
        endpoint_parameters("ssl:8443:privateKey=key.pem\\")


# --- what is imported is declared ---------------------------------------------------------------

@pytest.mark.parametrize("name, module", [("werkzeug", "werkzeug.exceptions"), ("txaio", "txaio"),
                                          ("zope.interface", "zope.interface")])
def test_a_library_imported_directly_is_declared(name, module):
    """Imported by circles itself, not only through another dependency (circles/webhooks.py
    handles werkzeug's HTTPException; circles/protocol.py uses txaio; zope.interface throughout)."""
    __import__(module)
    assert _pin(name)
