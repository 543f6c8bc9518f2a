"""circles.common.jsonrpc against the JSON-RPC 2.0 specification, transport-agnostic, no reactor.

The first group reproduces the examples of section 7 of https://www.jsonrpc.org/specification
with a test-local method table (subtract, sum, update, notify_hello, get_data) and checks each
reply against the spec's expected reply. Error messages are our own wording, so an error is
compared by code and by the spec's message being the start of ours.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from circles.common.fast_json import MAX_DEPTH
from circles.common.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    PARSE_ERROR,
    Dispatcher,
    Methods,
    Param,
    RPCError,
    bind_params,
)

from ..inmemory import captured_log, fired, replied

TOO_MANY = -32006
MAX_BATCH = 10
NUMBER = (int, float)


class Context:
    def __init__(self) -> None:
        self.calls: list = []
        self.pending: list = []  # later_in_order's Deferreds


methods = Methods()


@methods.add("subtract", Param("minuend", NUMBER), Param("subtrahend", NUMBER))
def subtract(ctx, minuend, subtrahend):
    ctx.calls.append(("subtract", minuend, subtrahend))
    return minuend - subtrahend


@methods.add("sum", raw_params=True)
def sum_(ctx, params):
    ctx.calls.append(("sum", params))
    if not isinstance(params, list) or not all(isinstance(x, NUMBER) and not isinstance(x, bool) for x in params):
        raise RPCError(INVALID_PARAMS, "Invalid params: sum takes an array of numbers")
    return sum(params)


@methods.add("update", raw_params=True)
def update(ctx, params):
    ctx.calls.append(("update", params))


@methods.add("notify_hello", raw_params=True)
def notify_hello(ctx, params):
    ctx.calls.append(("notify_hello", params))


@methods.add("notify_sum", raw_params=True)
def notify_sum(ctx, params):
    ctx.calls.append(("notify_sum", params))


@methods.add("get_data")
def get_data(ctx):
    return ["hello", 5]


@methods.add("echo", Param("value", (str, int, float, bool, dict, list, type(None))))
def echo(ctx, value):
    return value


@methods.add("boom")
def boom(ctx):
    raise KeyError("secret-internal-detail /etc/passwd")


@methods.add("later", Param("value", (int,)))
def later(ctx, value):
    d = Deferred()
    ctx.calls.append(("later", d))
    d.addCallback(lambda _: value * 2)
    return d


@methods.add("later_fail")
def later_fail(ctx):
    d = Deferred()
    ctx.calls.append(("later_fail", d))
    return d


@methods.add("later_in_order", Param("value", (int,)), ordered=True)
def later_in_order(ctx, value):
    ctx.calls.append(("later_in_order", value))
    d = Deferred()
    ctx.pending.append(d)
    d.addCallback(lambda _: value)
    return d


@methods.add("app_error")
def app_error(ctx):
    raise RPCError(-32005, "Script failed", {"line": 3})


@methods.add("unserialisable")
def unserialisable(ctx):
    return {"value": object()}


@methods.add("opt", Param("a", (str,)), Param("b", (int,), required=False))
def opt(ctx, a, b=None):
    return [a, b]


def make_dispatcher(max_batch: int = MAX_BATCH) -> Dispatcher:
    return Dispatcher(methods, max_batch, RPCError(TOO_MANY, "Too many requests"))


def call(message, ctx=None, dispatcher=None):
    """Send ``message`` (text, bytes, or a JSON value to be encoded); return the parsed reply or None."""
    dispatcher = dispatcher or make_dispatcher()
    ctx = ctx or Context()
    if not isinstance(message, (str, bytes)):
        message = json.dumps(message)
    text = replied(dispatcher.answer(message, ctx))
    if text is None:
        return None
    assert isinstance(text, str)
    text.encode("utf-8")  # what the transport will do: must not fail
    return json.loads(text)


def assert_error(reply, code, spec_message, id_=None):
    assert set(reply) == {"jsonrpc", "error", "id"}
    assert reply["jsonrpc"] == "2.0"
    assert reply["id"] == id_ and type(reply["id"]) is type(id_)
    assert reply["error"]["code"] == code
    assert reply["error"]["message"].startswith(spec_message)


def without_messages(reply):
    """The reply with each error's message replaced by its spec prefix check done elsewhere."""
    if isinstance(reply, list):
        return [without_messages(r) for r in reply]
    if "error" in reply:
        reply = dict(reply, error={k: v for k, v in reply["error"].items() if k != "message"})
    return reply


# --- section 7, one example per test -------------------------------------------------------


def test_spec_positional_parameters():
    assert call('{"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}') == \
        {"jsonrpc": "2.0", "result": 19, "id": 1}
    assert call('{"jsonrpc": "2.0", "method": "subtract", "params": [23, 42], "id": 2}') == \
        {"jsonrpc": "2.0", "result": -19, "id": 2}


def test_spec_named_parameters():
    assert call('{"jsonrpc": "2.0", "method": "subtract", "params": {"subtrahend": 23, "minuend": 42}, "id": 3}') == \
        {"jsonrpc": "2.0", "result": 19, "id": 3}
    assert call('{"jsonrpc": "2.0", "method": "subtract", "params": {"minuend": 42, "subtrahend": 23}, "id": 4}') == \
        {"jsonrpc": "2.0", "result": 19, "id": 4}


def test_spec_notification():
    ctx = Context()
    assert call('{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}', ctx) is None
    assert ctx.calls == [("update", [1, 2, 3, 4, 5])]  # a notification is still run
    assert call('{"jsonrpc": "2.0", "method": "foobar"}') is None


def test_spec_non_existent_method():
    reply = call('{"jsonrpc": "2.0", "method": "foobar", "id": "1"}')
    assert reply == {"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"}, "id": "1"}


def test_spec_invalid_json():
    reply = call('{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]')
    assert_error(reply, PARSE_ERROR, "Parse error", None)


def test_spec_invalid_request_object():
    reply = call('{"jsonrpc": "2.0", "method": 1, "params": "bar"}')
    assert_error(reply, INVALID_REQUEST, "Invalid Request", None)


def test_spec_batch_invalid_json():
    reply = call('[\n  {"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},\n  {"jsonrpc": "2.0", "method"\n]')
    assert isinstance(reply, dict)  # a single error, not an array
    assert_error(reply, PARSE_ERROR, "Parse error", None)


def test_spec_empty_array():
    reply = call("[]")
    assert isinstance(reply, dict)
    assert_error(reply, INVALID_REQUEST, "Invalid Request", None)


def test_spec_invalid_batch_not_empty():
    reply = call("[1]")
    assert isinstance(reply, list) and len(reply) == 1
    assert_error(reply[0], INVALID_REQUEST, "Invalid Request", None)


def test_spec_invalid_batch():
    reply = call("[1,2,3]")
    assert isinstance(reply, list) and len(reply) == 3
    for r in reply:
        assert_error(r, INVALID_REQUEST, "Invalid Request", None)


def test_spec_mixed_batch():
    ctx = Context()
    reply = call("""[
        {"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},
        {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},
        {"jsonrpc": "2.0", "method": "subtract", "params": [42,23], "id": "2"},
        {"foo": "boo"},
        {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
        {"jsonrpc": "2.0", "method": "get_data", "id": "9"}
    ]""", ctx)
    expected = [
        {"jsonrpc": "2.0", "result": 7, "id": "1"},
        {"jsonrpc": "2.0", "result": 19, "id": "2"},
        {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None},
        {"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"}, "id": "5"},
        {"jsonrpc": "2.0", "result": ["hello", 5], "id": "9"},
    ]
    assert isinstance(reply, list)
    key = lambda r: json.dumps(r, sort_keys=True)  # the spec allows any order
    assert sorted(map(key, without_messages(reply))) == sorted(map(key, without_messages(expected)))
    for got in reply:
        if "error" in got:
            want = next(e for e in expected if e["id"] == got["id"])
            assert got["error"]["message"].startswith(want["error"]["message"])
    assert ("notify_hello", [7]) in ctx.calls


def test_spec_batch_all_notifications():
    ctx = Context()
    reply = call("""[
        {"jsonrpc": "2.0", "method": "notify_sum", "params": [1,2,4]},
        {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]}
    ]""", ctx)
    assert reply is None
    assert ctx.calls == [("notify_sum", [1, 2, 4]), ("notify_hello", [7])]


# --- id handling ----------------------------------------------------------------------------


@pytest.mark.parametrize("id_text, id_value", [
    ('"abc"', "abc"),
    ('""', ""),
    ('"\\u00e9\\ud83d\\ude00"', "\u00e9\U0001F600"),
    ("7", 7),
    ("0", 0),
    ("-3", -3),
    ("1.5", 1.5),
    ("null", None),
    ("123456789012345678901234567890", 123456789012345678901234567890),
])
def test_id_echoed_exactly(id_text, id_value):
    text = replied(make_dispatcher().answer(
        '{"jsonrpc": "2.0", "method": "get_data", "id": %s}' % id_text, Context()))
    reply = json.loads(text)
    assert reply["id"] == id_value and type(reply["id"]) is type(id_value)
    assert reply["result"] == ["hello", 5]
    if isinstance(id_value, int):
        assert ('"id":%s' % id_text) in text.replace(" ", "")  # big ints keep every digit


@pytest.mark.parametrize("bad_id", ["true", "false", "{}", '{"a": 1}', "[]", "[1]"])
def test_bool_object_array_ids_refused(bad_id):
    ctx = Context()
    reply = call('{"jsonrpc": "2.0", "method": "subtract", "params": [1, 2], "id": %s}' % bad_id, ctx)
    assert_error(reply, INVALID_REQUEST, "Invalid Request", None)
    assert ctx.calls == []  # the method was not run


def test_lone_surrogate_id_is_echoed_as_valid_utf8():
    # "\ud800" is valid JSON text; the reply must still be encodable for a text frame.
    text = replied(make_dispatcher().answer('{"jsonrpc": "2.0", "method": "get_data", "id": "\\ud800"}', Context()))
    text.encode("utf-8")
    assert json.loads(text)["id"] == "\ud800"


# --- notifications never answered --------------------------------------------------------------


@pytest.mark.parametrize("message", [
    {"jsonrpc": "2.0", "method": "nope"},
    {"jsonrpc": "2.0", "method": "subtract", "params": [1]},
    {"jsonrpc": "2.0", "method": "subtract", "params": ["a", "b"]},
    {"jsonrpc": "2.0", "method": "app_error"},
])
def test_failing_notifications_get_no_reply(message):
    assert call(message) is None


def test_failing_notification_with_exception_gets_no_reply_but_is_logged():
    with captured_log() as events:
        assert call({"jsonrpc": "2.0", "method": "boom"}) is None
    assert any(e.get("log_failure") is not None and e["log_failure"].check(KeyError) for e in events)


# --- errors ---------------------------------------------------------------------------------


def test_one_error_class_raised_by_methods_and_by_the_client():
    from circles.client import RPCError as ClientRPCError

    assert ClientRPCError is RPCError
    error = RPCError.from_json({"code": -32005, "message": "Script failed", "data": "division by zero"})
    assert (error.code, error.message, error.data) == (-32005, "Script failed", "division by zero")
    assert error.to_json() == {"code": -32005, "message": "Script failed", "data": "division by zero"}
    assert str(error) == "-32005 Script failed: division by zero"
    bare = RPCError.from_json({"code": -32601, "message": "Method not found"})
    assert bare.data is None and bare.to_json() == {"code": -32601, "message": "Method not found"}
    assert str(bare) == "-32601 Method not found"
    assert str(RPCError(-32007, "Reply too large", {"size": 2})) == '-32007 Reply too large: {"size": 2}'
    assert RPCError.from_json("nonsense").code == INTERNAL_ERROR


def test_handler_exception_is_internal_error_without_traceback_and_logged():
    with captured_log() as events:
        text = replied(make_dispatcher().answer('{"jsonrpc": "2.0", "method": "boom", "id": 1}', Context()))
    reply = json.loads(text)
    assert_error(reply, INTERNAL_ERROR, "Internal error", 1)
    assert "data" not in reply["error"]
    for leak in ("secret-internal-detail", "Traceback", "KeyError", "passwd", ".py"):
        assert leak not in text
    failures = [e for e in events if e.get("log_failure") is not None]
    assert failures and failures[0]["log_failure"].check(KeyError)
    assert failures[0].get("method") == "boom"


def test_rpc_error_keeps_code_and_data():
    reply = call({"jsonrpc": "2.0", "method": "app_error", "id": "x"})
    assert reply == {"jsonrpc": "2.0", "error": {"code": -32005, "message": "Script failed", "data": {"line": 3}}, "id": "x"}


def test_unserialisable_result_is_internal_error():
    with captured_log():
        reply = call({"jsonrpc": "2.0", "method": "unserialisable", "id": 4})
    assert_error(reply, INTERNAL_ERROR, "Internal error", 4)


def test_unserialisable_result_in_batch_spares_the_others():
    with captured_log():
        reply = call([{"jsonrpc": "2.0", "method": "unserialisable", "id": 4},
                      {"jsonrpc": "2.0", "method": "get_data", "id": 5}])
    by_id = {r["id"]: r for r in reply}
    assert by_id[4]["error"]["code"] == INTERNAL_ERROR
    assert by_id[5]["result"] == ["hello", 5]


@pytest.mark.parametrize("message, code", [
    ({"method": "get_data", "id": 1}, INVALID_REQUEST),  # no jsonrpc member
    ({"jsonrpc": "1.0", "method": "get_data", "id": 1}, INVALID_REQUEST),
    ({"jsonrpc": 2.0, "method": "get_data", "id": 1}, INVALID_REQUEST),
    ({"jsonrpc": "2.0", "id": 1}, INVALID_REQUEST),
    ({"jsonrpc": "2.0", "method": None, "id": 1}, INVALID_REQUEST),
    ({"jsonrpc": "2.0", "method": "get_data", "params": 3, "id": 1}, INVALID_REQUEST),
    ({"jsonrpc": "2.0", "method": "get_data", "params": "x", "id": 1}, INVALID_REQUEST),
    ({"jsonrpc": "2.0", "method": "get_data", "params": None, "id": 1}, INVALID_REQUEST),
])
def test_wrong_shapes_are_invalid_request_with_id_when_known(message, code):
    assert_error(call(message), code, "Invalid Request", 1)


@pytest.mark.parametrize("message", ["1", '"x"', "null", "true", "3.5"])
def test_non_object_request_is_invalid_request(message):
    assert_error(call(message), INVALID_REQUEST, "Invalid Request", None)


def test_batch_over_the_limit_gets_the_configured_error():
    ctx = Context()
    batch = [{"jsonrpc": "2.0", "method": "update", "params": [i], "id": i} for i in range(4)]
    reply = call(batch, ctx, make_dispatcher(max_batch=3))
    assert isinstance(reply, dict)
    assert reply == {"jsonrpc": "2.0", "error": {"code": TOO_MANY, "message": "Too many requests"}, "id": None}
    assert ctx.calls == []  # refused whole
    reply = call(batch[:3], ctx, make_dispatcher(max_batch=3))
    assert len(reply) == 3


def test_deferred_handlers():
    ctx = Context()
    d = make_dispatcher().answer('[{"jsonrpc":"2.0","method":"later","params":[21],"id":1},'
                                 '{"jsonrpc":"2.0","method":"get_data","id":2}]', ctx)
    assert not d.called  # the batch waits for its slowest member
    [(_, pending)] = ctx.calls
    pending.callback(None)
    reply = json.loads(fired(d))
    assert sorted(reply, key=lambda r: r["id"]) == [
        {"jsonrpc": "2.0", "result": 42, "id": 1},
        {"jsonrpc": "2.0", "result": ["hello", 5], "id": 2},
    ]


def test_deferred_handler_failing_late():
    ctx = Context()
    with captured_log() as events:
        d = make_dispatcher().answer('{"jsonrpc":"2.0","method":"later_fail","id":"z"}', ctx)
        [(_, pending)] = ctx.calls
        pending.errback(Failure(ZeroDivisionError("hidden")))
        text = fired(d)
    assert_error(json.loads(text), INTERNAL_ERROR, "Internal error", "z")
    assert "hidden" not in text
    assert any(e.get("log_failure") is not None and e["log_failure"].check(ZeroDivisionError) for e in events)

    ctx = Context()
    d = make_dispatcher().answer('{"jsonrpc":"2.0","method":"later_fail","id":"y"}', ctx)
    ctx.calls[0][1].errback(Failure(RPCError(-32003, "Script timed out")))
    assert_error(json.loads(fired(d)), -32003, "Script timed out", "y")


# --- hostile input --------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [
    "[" * 100_000,
    "{\"a\":" * 100_000,
    "[" * 100_000 + "]" * 100_000,
    ('{"jsonrpc":"2.0","method":"echo","params":[' + "[" * 100_000 + "]" * 100_000 + '],"id":1}'),
])
def test_deeply_nested_json_is_parse_error(payload):
    for message in (payload, payload.encode("ascii")):
        assert_error(call(message), PARSE_ERROR, "Parse error", None)


def test_deep_nesting_refused_even_with_a_raised_recursion_limit():
    # py_ecc (imported by eth-account) raises the limit to 100,000 at import; an embedding
    # application may too. json's C decoder then overflows the C stack: a segfault, not -32700.
    saved = sys.getrecursionlimit()
    sys.setrecursionlimit(200_000)
    try:
        for payload in ("[" * 100_000, "[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000):
            assert_error(call(payload), PARSE_ERROR, "Parse error", None)
    finally:
        sys.setrecursionlimit(saved)


def test_depth_limit_boundary():
    # batch array + request object + params array + nested = MAX_DEPTH
    nested = "[" * (MAX_DEPTH - 3) + "]" * (MAX_DEPTH - 3)
    reply = call('[{"jsonrpc":"2.0","method":"echo","params":[%s],"id":1}]' % nested)
    assert reply[0]["result"] == json.loads(nested)
    assert_error(call("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)), PARSE_ERROR, "Parse error: nested")
    # brackets inside strings are not nesting
    text = "[{" * 10_000 + '\\"[\\'
    reply = call({"jsonrpc": "2.0", "method": "echo", "params": [text], "id": 2})
    assert reply["result"] == text


def test_moderately_nested_params_still_work():
    nested = "[" * 200 + "]" * 200
    reply = call('{"jsonrpc":"2.0","method":"echo","params":[%s],"id":1}' % nested)
    assert reply["result"] == json.loads(nested)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_non_finite_numbers_are_parse_error(number):
    for place in ('{"jsonrpc":"2.0","method":"echo","params":[%s],"id":1}',
                  '{"jsonrpc":"2.0","method":"get_data","id":%s}'):
        assert_error(call(place % number), PARSE_ERROR, "Parse error", None)


def test_too_many_digits_is_parse_error():
    assert_error(call('{"jsonrpc":"2.0","method":"echo","params":[%s],"id":1}' % ("9" * 5000)),
                 PARSE_ERROR, "Parse error", None)


REQUEST = '{"jsonrpc":"2.0","method":"echo","params":["\u00e9t\u00e9"],"id":1}'


@pytest.mark.parametrize("payload", [
    b"\xff\xfe\xfd",
    b'{"jsonrpc":"2.0","method":"get_data","id":"\xff"}',
    REQUEST.encode("latin-1"),
    REQUEST.encode("utf-16"),
    REQUEST.encode("utf-16-le"),
    REQUEST.encode("utf-16-be"),
    REQUEST.encode("utf-32"),
    b'{"jsonrpc":"2.0","method":"get_data","id":"\xed\xa0\x80"}',  # an encoded surrogate is not UTF-8
    b'{"jsonrpc":"2.0","method":"get_data","id":"\xc0\xaf"}',  # overlong
])
def test_non_utf8_bytes_are_parse_error(payload):
    assert_error(call(payload), PARSE_ERROR, "Parse error", None)


def test_utf8_bytes_are_accepted():
    assert call(REQUEST.encode("utf-8")) == {"jsonrpc": "2.0", "result": "\u00e9t\u00e9", "id": 1}


# --- params ---------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [
    ["a", 1],
    [1, 2, 3],
    {"minuend": "42", "subtrahend": 1},
    {"minuend": True, "subtrahend": 1},
    {"minuend": None, "subtrahend": 1},
    {"minuend": [1], "subtrahend": 1},
    {"minuend": 1},
    [1],
    [],
    {"minuend": 1, "subtrahend": 2, "extra": 3},
    {"minuend": 1, "subtrahend": 2, "": 3},
])
def test_params_that_do_not_fit_are_invalid_params(params):
    ctx = Context()
    reply = call({"jsonrpc": "2.0", "method": "subtract", "params": params, "id": 9}, ctx)
    assert_error(reply, INVALID_PARAMS, "Invalid params", 9)
    assert ctx.calls == []


def test_invalid_params_messages_name_the_problem():
    msg = lambda p: call({"jsonrpc": "2.0", "method": "subtract", "params": p, "id": 1})["error"]["message"]
    assert "extra" in msg({"minuend": 1, "subtrahend": 2, "extra": 3})
    assert "subtrahend" in msg({"minuend": 1})
    assert "2" in msg([1, 2, 3]) and "3" in msg([1, 2, 3])
    assert msg({"minuend": "x", "subtrahend": 1}) == "Invalid params: 'minuend' must be a number"
    assert msg({"minuend": 1}) == "Invalid params: 'subtrahend' is required"


def test_params_for_a_method_taking_none():
    assert call({"jsonrpc": "2.0", "method": "get_data", "params": [], "id": 1})["result"] == ["hello", 5]
    assert call({"jsonrpc": "2.0", "method": "get_data", "params": {}, "id": 1})["result"] == ["hello", 5]
    assert_error(call({"jsonrpc": "2.0", "method": "get_data", "params": [1], "id": 1}), INVALID_PARAMS, "Invalid params", 1)
    assert_error(call({"jsonrpc": "2.0", "method": "get_data", "params": {"x": 1}, "id": 1}), INVALID_PARAMS, "Invalid params", 1)


def test_bind_params_optional_and_positional():
    spec = (Param("a", (str,)), Param("b", (int,), required=False))
    assert bind_params(["x"], spec) == {"a": "x"}
    assert bind_params(["x", 2], spec) == {"a": "x", "b": 2}
    assert bind_params({"b": 2, "a": "x"}, spec) == {"a": "x", "b": 2}
    assert bind_params(None, (Param("c", (int,), required=False),)) == {}
    with pytest.raises(RPCError) as e:
        bind_params({"b": 2}, spec)
    assert e.value.code == INVALID_PARAMS
    with pytest.raises(RPCError) as e:
        bind_params(["x", 2.5], spec)
    assert e.value.code == INVALID_PARAMS
    with pytest.raises(RPCError) as e:
        bind_params(["x", True], spec)  # a bool is not a JSON number
    assert e.value.code == INVALID_PARAMS
    assert call({"jsonrpc": "2.0", "method": "opt", "params": ["x"], "id": 1})["result"] == ["x", None]


# --- any JSON at all ------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
method_names = st.sampled_from(["subtract", "sum", "update", "get_data", "echo", "boom", "app_error",
                                "unserialisable", "opt", "nope", "rpc.x", ""])
ids = st.none() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5) \
    | st.booleans() | st.just([]) | st.just({})
requestish = st.fixed_dictionaries(
    {"jsonrpc": st.sampled_from(["2.0", "2.0", "2.0", "1.0", 2])},
    optional={"method": method_names | json_values, "params": json_values, "id": ids},
)
messages = st.one_of(json_values, requestish, st.lists(requestish | json_values, max_size=MAX_BATCH + 2))


def _valid_id(v):
    return v is None or (isinstance(v, (str, int, float)) and not isinstance(v, bool))


def _is_notification(m):
    return (isinstance(m, dict) and "id" not in m and m.get("jsonrpc") == "2.0"
            and isinstance(m.get("method"), str) and ("params" not in m or isinstance(m["params"], (list, dict))))


def _check_response(r, expected_id):
    assert isinstance(r, dict) and r.get("jsonrpc") == "2.0" and "id" in r
    assert ("result" in r) != ("error" in r)
    assert set(r) <= {"jsonrpc", "result", "error", "id"}
    if "error" in r:
        err = r["error"]
        assert isinstance(err["code"], int) and not isinstance(err["code"], bool)
        assert isinstance(err["message"], str)
        assert set(err) <= {"code", "message", "data"}
    assert r["id"] == expected_id or (expected_id != expected_id)


def _expected_id(m):
    if isinstance(m, dict) and "id" in m and _valid_id(m["id"]):
        return m["id"]
    return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=messages, as_bytes=st.booleans())
def test_any_json_message_gets_none_or_valid_responses(message, as_bytes):
    text = json.dumps(message)
    payload = text.encode("utf-8") if as_bytes else text
    with captured_log():
        reply_text = replied(make_dispatcher().answer(payload, Context()))
    if isinstance(message, list) and message and len(message) <= MAX_BATCH:
        expected = [m for m in message if not _is_notification(m)]
        if not expected:
            assert reply_text is None
            return
        reply_text.encode("utf-8")
        reply = json.loads(reply_text)
        assert isinstance(reply, list) and len(reply) == len(expected)
        for r, m in zip(reply, expected):
            _check_response(r, _expected_id(m))
    elif isinstance(message, list):
        reply_text.encode("utf-8")
        reply = json.loads(reply_text)
        _check_response(reply, None)
        assert reply["error"]["code"] in (INVALID_REQUEST, TOO_MANY)
    elif _is_notification(message):
        assert reply_text is None
    else:
        reply_text.encode("utf-8")
        reply = json.loads(reply_text)
        _check_response(reply, _expected_id(message))
        if isinstance(reply.get("id"), float):
            assert not math.isnan(reply["id"])


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=64) | st.text(max_size=64))
def test_any_bytes_or_text_never_raise(payload):
    with captured_log():
        reply_text = replied(make_dispatcher().answer(payload, Context()))
    if reply_text is not None:
        reply_text.encode("utf-8")
        reply = json.loads(reply_text)
        assert isinstance(reply, (dict, list))


# --- the orjson fast path agrees with the standard library ------------------------------------


@methods.add("not_a_number")
def not_a_number(ctx):
    return {"nan": float("nan"), "inf": float("inf"), "ok": 1.5}


@pytest.mark.parametrize("number", [2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**30, -(10**30)])
def test_integers_around_64_bits_keep_every_digit(number):
    text = replied(make_dispatcher().answer(
        '{"jsonrpc":"2.0","method":"echo","params":[%d],"id":%d}' % (number, number), Context()))
    assert '"result":%d' % number in text and '"id":%d' % number in text


def test_many_digit_floats_parse_as_the_standard_library_does():
    for literal in ("0.12345678901234567890123", "123456789012345678901.5", "1e-400", "2.2250738585072014e-308"):
        reply = call('{"jsonrpc":"2.0","method":"echo","params":[%s],"id":1}' % literal)
        assert reply["result"] == json.loads(literal)


def test_non_finite_results_are_written_as_null():
    assert call({"jsonrpc": "2.0", "method": "not_a_number", "id": 1})["result"] == {"nan": None, "inf": None, "ok": 1.5}


def test_non_ascii_results_are_utf8_json():
    reply = replied(make_dispatcher().answer('{"jsonrpc":"2.0","method":"echo","params":["\\u00e9\\ud83d\\ude00"],"id":1}',
                                           Context()))
    assert json.loads(reply.encode("utf-8"))["result"] == "\u00e9\U0001F600"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values | st.integers(min_value=-(2**80), max_value=2**80))
def test_fast_parse_equals_the_standard_library(value):
    from circles.common.jsonrpc import parse
    text = json.dumps(value)
    expected = json.loads(text)
    for payload in (text, text.encode("utf-8", "surrogatepass")):
        try:
            got = parse(payload)
        except RPCError:
            # only text the standard library also refuses as a message (encoded lone surrogates)
            assert isinstance(payload, bytes)
            continue
        assert json.dumps(got) == json.dumps(expected)


# --- replies over the size limit -------------------------------------

TOO_LARGE = -32007
LIMIT = 1000


def sized_dispatcher(limit: int = LIMIT) -> Dispatcher:
    return Dispatcher(methods, 200, RPCError(TOO_MANY, "Too many requests"), max_reply=limit,
                      too_large=lambda size: RPCError(TOO_LARGE, "Reply too large", {"size": size, "limit": limit}))


def _request(method, params=None, id_=None) -> dict:
    message = {"jsonrpc": "2.0", "method": method, "id": id_}
    if params is not None:
        message["params"] = params
    return message


def _utf8_size(reply) -> int:
    return len(json.dumps(reply, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


@pytest.mark.parametrize("value", ["x" * LIMIT, '"' * 600, "é" * 600, "\U0001f600" * 300, list(range(400))])
def test_a_reply_over_the_limit_is_an_error_with_its_size(value):
    """Counted in UTF-8 bytes of the encoded reply: quotes double, 'é' takes two bytes."""
    reply = call(_request("echo", [value], id_=5), dispatcher=sized_dispatcher())
    assert reply["id"] == 5
    assert reply["error"]["code"] == TOO_LARGE
    size = reply["error"]["data"]["size"]
    assert size > LIMIT and reply["error"]["data"]["limit"] == LIMIT
    assert size == len(json.dumps({"jsonrpc": "2.0", "result": value, "id": 5}, separators=(",", ":"),
                                  ensure_ascii=False).encode("utf-8"))


def test_a_reply_at_the_limit_is_sent():
    overhead = len('{"jsonrpc":"2.0","result":"","id":5}')
    reply = call(_request("echo", ["x" * (LIMIT - overhead)], id_=5), dispatcher=sized_dispatcher())
    assert reply["result"] == "x" * (LIMIT - overhead)


def test_a_late_reply_over_the_limit_is_an_error():
    ctx = Context()
    d = sized_dispatcher().answer(json.dumps(_request("later_fail", id_="l")), ctx)
    [(_, pending)] = ctx.calls
    pending.callback("y" * LIMIT)  # a play's output, say
    reply = json.loads(fired(d))
    assert reply["id"] == "l" and reply["error"]["code"] == TOO_LARGE


def test_a_batch_over_the_limit_has_its_largest_parts_replaced():
    batch = [_request("echo", ["a" * 300], id_=i) for i in range(5)] + [_request("echo", ["small"], id_="s")]
    reply = call(batch, dispatcher=sized_dispatcher())
    assert _utf8_size(reply) <= LIMIT
    assert [r["id"] for r in reply] == [0, 1, 2, 3, 4, "s"]
    kept = [r for r in reply if "result" in r]
    replaced = [r for r in reply if "error" in r]
    assert reply[-1]["result"] == "small"
    assert len(kept) == 2 and all(r["error"]["code"] == TOO_LARGE for r in replaced)  # as few replaced as fit
    assert all(r["error"]["data"]["size"] == len('{"jsonrpc":"2.0","result":"","id":0}') + 300 for r in replaced)


def test_a_reply_whose_id_alone_is_too_large_raises_reply_too_large():
    from circles.common.jsonrpc import ReplyTooLarge

    with pytest.raises(ReplyTooLarge) as refused:
        sized_dispatcher().answer(json.dumps(_request("no_such_method", id_="i" * LIMIT)), Context())
    assert refused.value.limit == LIMIT
    with pytest.raises(ReplyTooLarge):
        sized_dispatcher().answer(json.dumps([_request("get_data", id_="i" * 300) for _ in range(4)]), Context())


def test_no_limit_means_no_check():
    assert call(_request("echo", ["x" * 100_000], id_=1), dispatcher=sized_dispatcher(0))["result"] == "x" * 100_000


# --- ordered methods in a batch -------------------------------------------------------------------


def _named(method, id_, **params):
    return {"jsonrpc": "2.0", "method": method, "params": params, "id": id_}


def test_the_calls_after_an_ordered_method_that_answers_later_wait_for_it():
    ctx = Context()
    batch = [_named("subtract", 0, minuend=1, subtrahend=1), _named("later", 1, value=1),
             _named("later_in_order", 2, value=2), _named("subtract", 3, minuend=3, subtrahend=1),
             _named("later_in_order", 4, value=4), _named("subtract", 5, minuend=5, subtrahend=1)]
    d = make_dispatcher().answer(json.dumps(batch), ctx)
    # Before it: called. After it: not yet (a method that is not ordered holds nothing back).
    assert [c[0] for c in ctx.calls] == ["subtract", "later", "later_in_order"]
    ctx.pending[0].callback(None)
    assert [c[0] for c in ctx.calls] == ["subtract", "later", "later_in_order", "subtract", "later_in_order"]
    ctx.pending[1].callback(None)
    assert [c[0] for c in ctx.calls][-1] == "subtract" and len(ctx.calls) == 6
    assert not d.called  # "later" has not answered
    ctx.calls[1][1].callback(None)
    assert [r.get("result") for r in json.loads(fired(d))] == [0, 2, 2, 2, 4, 4]


def test_the_calls_after_an_ordered_method_that_fails_run_once_it_has_answered():
    ctx = Context()
    batch = [_named("later_in_order", 1, value=1), _named("subtract", 2, minuend=2, subtrahend=1)]
    d = make_dispatcher().answer(json.dumps(batch), ctx)
    assert len(ctx.calls) == 1
    ctx.pending[0].errback(RPCError(-32002, "Authentication failed"))
    first, second = json.loads(fired(d))
    assert first["error"]["code"] == -32002 and second["result"] == 1


def test_is_deferred_is_isinstance_of_deferred():
    from twisted.internet.defer import Deferred, DeferredList, gatherResults, succeed

    from circles.common.jsonrpc import is_deferred

    deferreds = [Deferred(), succeed(1), DeferredList([]), gatherResults([succeed(1)])]
    plain = [None, "text", {"jsonrpc": "2.0"}, [1], 3, object()]
    assert [is_deferred(v) for v in deferreds + plain] == [isinstance(v, Deferred) for v in deferreds + plain]
    assert all(is_deferred(d) for d in deferreds) and not any(is_deferred(v) for v in plain)
