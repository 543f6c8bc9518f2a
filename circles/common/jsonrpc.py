"""JSON-RPC 2.0 (https://www.jsonrpc.org/specification), transport-agnostic, on Deferreds.

No maintained JSON-RPC library speaks Twisted's Deferreds, so this is the one small module that
follows the specification: requests, notifications (never answered, even when they fail),
batches (an empty batch is one Invalid Request error; a batch of notifications gets no reply),
``id`` echoed exactly, the reserved error codes. Handlers are plain callables returning a value
or a Deferred; they raise :class:`RPCError` for errors the client should see. Any other
exception is logged and becomes -32603 with no detail, so no traceback ever reaches a client.

Messages are decoded and replies encoded with orjson, several times faster than the standard
library's ``json`` on the small messages this serves; the standard library takes over
wherever orjson would differ from it: integers beyond 64 bits (orjson reads them as floats
and refuses to write them), lone surrogates (valid JSON text that orjson refuses) and any
message orjson rejects, so errors are reported exactly as before. Non-finite floats in a
result are written as ``null``, as ``JSON.stringify`` does (JSON has no NaN or Infinity).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import orjson
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.python.failure import Failure

from circles.common.fast_json import long_digits, too_deep
from circles.common.logs import Logger

if TYPE_CHECKING:  # for the checker only: typing's own TypeIs is Python 3.13's
    from typing_extensions import TypeIs

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
#: The outcome ``observe`` is told for a request whose method's Deferred was cancelled (no reply).
CANCELLED = "cancelled"

_MISSING = object()
log = Logger()

JSONValue = Any
Params = list | dict | None


def is_deferred(value: object) -> TypeIs[Deferred]:
    """``isinstance(value, Deferred)``, without its cost when it is not one: Deferred is an
    ``Awaitable`` (an ABC), so ``isinstance`` asks ``ABCMeta.__instancecheck__`` in Python for every
    reply that is a dict or a str, four times a message on the hot path."""
    return Deferred in type(value).__mro__


class ReplyTooLarge(Exception):
    """Not even an error reply fits in one message (the request's own id is too long to echo):
    the transport has to refuse another way (a WebSocket closes with 1009)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"reply of {size} bytes exceeds the limit of {limit}")
        self.size = size
        self.limit = limit


class RPCError(Exception):
    """A JSON-RPC error object: raised by a method for the client to see, and by the client
    (:mod:`circles.client`) for an error the server answered. ``data`` is None when there is
    none: a ``data`` of null is never sent, and reads as none."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.data = data

    @classmethod
    def from_json(cls, error: Any) -> RPCError:
        """The error of a reply's ``error`` member; anything but an object is -32603."""
        if not isinstance(error, dict):
            return cls(INTERNAL_ERROR, f"malformed error object: {error!r}")
        return cls(error.get("code", INTERNAL_ERROR), str(error.get("message", "")), error.get("data"))

    def to_json(self) -> dict:
        error = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error

    def __str__(self) -> str:
        text = f"{self.code} {self.message}"
        if self.data is not None:
            text += f": {self.data if isinstance(self.data, str) else json.dumps(self.data)}"
        return text


@attrs.frozen
class Param:
    """One parameter of a method: its name, accepted JSON types, and whether it may be left out."""

    name: str
    types: tuple
    required: bool = True

    def check(self, value: Any) -> Any:
        # bool is an int in Python but not a number in JSON.
        if not isinstance(value, self.types) or (isinstance(value, bool) and bool not in self.types):
            names = " or ".join(dict.fromkeys(_JSON_TYPE_NAMES[t] for t in self.types))  # int, float: one name
            raise RPCError(INVALID_PARAMS, f"Invalid params: '{self.name}' must be {names}")
        return value


_JSON_TYPE_NAMES = {str: "a string", int: "a number", float: "a number", bool: "a boolean",
                    dict: "an object", list: "an array", type(None): "null"}


def bind_params(params: Params, spec: Sequence[Param]) -> dict:
    """Map by-position or by-name params onto ``spec``; -32602 for anything that does not fit."""
    if params is None:
        params = {}
    if isinstance(params, list):
        if len(params) > len(spec):
            raise RPCError(INVALID_PARAMS, f"Invalid params: at most {len(spec)} expected, got {len(params)}")
        params = {p.name: value for p, value in zip(spec, params)}
    elif params:
        unknown = params.keys() - {p.name for p in spec}
        if unknown:
            raise RPCError(INVALID_PARAMS, f"Invalid params: unknown parameter '{sorted(unknown)[0]}'")
    bound = {}
    for p in spec:
        if p.name in params:
            bound[p.name] = p.check(params[p.name])
        elif p.required:
            raise RPCError(INVALID_PARAMS, f"Invalid params: '{p.name}' is required")
    return bound


Handler = Callable[..., Any]


@attrs.frozen
class Method:
    """A callable exposed over JSON-RPC: ``handler(context, **bound_params)``.

    ``params`` is the canonical parameter list (what the documentation shows). A method that
    accepts other shapes as well sets ``raw_params`` and gets ``handler(context, params)`` with
    the params as sent (already checked to be an array, an object or absent).

    An ``ordered`` method is one whose effect the calls after it depend on (authenticate: a play
    after it runs as the key it proved): when it answers later, the calls after it in a batch
    start once it has answered. (Other methods' calls start at once, each answered when ready.)
    """

    name: str
    handler: Handler
    params: tuple = ()
    raw_params: bool = False
    ordered: bool = False

    def call(self, context: Any, params: Params) -> Any:
        if self.raw_params:
            return self.handler(context, params)
        return self.handler(context, **bind_params(params, self.params))


class Methods:
    """A registry of methods, built once at import time and shared by every session.

    ``Methods(a, b)`` starts with the methods of ``a`` and ``b`` as they are then (a name in
    both is ``b``'s): a table that is another's with more methods."""

    def __init__(self, *tables: Methods) -> None:
        self._methods: dict[str, Method] = {}
        for table in tables:
            self._methods.update(table._methods)

    def __contains__(self, name: str) -> bool:
        return name in self._methods

    def __iter__(self) -> Iterator[str]:
        return iter(self._methods)

    def add(self, name: str, *params: Param, raw_params: bool = False,
            ordered: bool = False) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self._methods[name] = Method(name, handler, tuple(params), raw_params, ordered)
            return handler
        return register

    def get(self, name: str) -> Method | None:
        return self._methods.get(name)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


# Built once: json.loads/dumps with options build a new decoder/encoder on every call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def parse(payload: str | bytes) -> JSONValue:
    """Decode one message; RPCError(-32700) for anything that is not JSON we can represent."""
    data = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
    if not too_deep(data) and not long_digits(data):
        try:
            # orjson takes UTF-8 only and refuses NaN, Infinity and numbers that overflow.
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # invalid, or valid but refused by orjson (a lone surrogate): decided below
    try:
        if isinstance(payload, bytes):
            # json.loads would guess UTF-16/32 from the bytes and let encoded surrogates
            # through; a message is UTF-8 and nothing else.
            payload = payload.decode("utf-8")
        # json's C decoder recurses once per level and stops only at the interpreter's
        # recursion limit, which a library may have raised (py_ecc, imported by
        # eth-account, sets 100,000): then 100,000 '[' overflow the C stack and kill the
        # process. So the depth is bounded here, not by sys.getrecursionlimit().
        if too_deep(payload):
            raise RPCError(PARSE_ERROR, "Parse error: nested too deeply")
        return _DECODER.decode(payload)
    except RecursionError:
        raise RPCError(PARSE_ERROR, "Parse error: nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise RPCError(PARSE_ERROR, "Parse error") from None


def _valid_id(value: Any) -> bool:
    return value is None or (isinstance(value, (str, int, float)) and not isinstance(value, bool))


def error_response(error: RPCError, id_: Any = None) -> dict:
    return {"jsonrpc": "2.0", "error": error.to_json(), "id": id_}


class ReplyRoom(Protocol):
    """How much a late reply (one a method gives later) may take when it is ready, for a
    connection that holds back what its peer has not read (:class:`circles.server.session.backlog.Backlog`)."""

    def left(self) -> int | None:
        """Bytes the reply may take now; None: no bound but ``max_reply``."""

    def refuse(self, size: int) -> RPCError:
        """The error answering, instead, a reply of ``size`` bytes that does not fit."""


class Dispatcher:
    """Turns one incoming message into at most one reply, calling methods from ``methods``.

    ``max_batch`` bounds the requests in one batch; a longer batch is refused whole with
    ``batch_error`` (the application's "too many requests" error).

    ``max_reply`` bounds a reply's UTF-8 size (0: no bound), checked on the encoded text so the
    transport is never handed what it cannot send. A reply over it is replaced by
    ``too_large(size)`` with the request's id; in a batch, the largest responses are replaced
    so, largest first, until the batch fits. When not even that fits (ids too long to echo),
    :class:`ReplyTooLarge` is raised (or the Deferred fails with it). A late reply is held, the
    same way, to what the ``room`` given to :meth:`answer` has left when it is ready, if less.
    """

    def __init__(self, methods: Methods, max_batch: int, batch_error: RPCError,
                 observe: Callable[[str | None, Any], None] = lambda method, outcome: None,
                 max_reply: int = 0, too_large: Callable[[int], RPCError] | None = None) -> None:
        self._methods = methods
        self._max_batch = max_batch
        self._batch_error = batch_error
        self._max_reply: int | None = max_reply or None
        self._too_large = too_large or (lambda size: RPCError(INTERNAL_ERROR, "Internal error: reply too large"))
        # observe(method, outcome) once per request: method None for an invalid one,
        # outcome "ok", the error code, or CANCELLED. For metrics.
        self._observe = observe

    def answer(self, payload: str | bytes, context: Any,
               admit: Callable[[int], RPCError | None] | None = None,
               room: ReplyRoom | None = None) -> str | None | Deferred:
        """The reply text (None when nothing is to be sent), or a Deferred of it when a method
        answers later: most replies are ready at once, and a Deferred per message would be a
        fifth of its cost. Raises (or the Deferred fails with) :class:`ReplyTooLarge` when no
        reply fits.

        ``admit(n)``, if given, is asked before ``n`` requests (a batch's length) run, and may
        refuse them all with an error (a rate limit): a batch gets it once with id null, a
        request with its own id, a notification nothing.

        ``room``, if given, is asked how much a reply that comes later may take (see :class:`ReplyRoom`).
        """
        try:
            message = parse(payload)
        except RPCError as e:
            self._observe(None, e.code)
            return encode(error_response(e))
        if isinstance(message, list):
            if not message:
                self._observe(None, INVALID_REQUEST)
                return encode(error_response(RPCError(INVALID_REQUEST, "Invalid Request: empty batch")))
            if len(message) > self._max_batch:
                self._observe(None, self._batch_error.code)
                return encode(error_response(self._batch_error))
            refused = admit(len(message)) if admit is not None else None
            if refused is not None:
                self._observe(None, refused.code)
                return encode(error_response(refused))
            # Calls start in order: a synchronous method has finished before the next one in the
            # batch begins, and so has an ordered one that answers later (_call_all).
            replies = self._call_all(message, context)
            if isinstance(replies, Deferred):  # an ordered method answers later: the rest waited for it
                return replies.addCallback(self._encode_batch, room)
            if any(isinstance(r, Deferred) for r in replies):
                d = gatherResults([r if isinstance(r, Deferred) else succeed(r) for r in replies], consumeErrors=True)
                return d.addCallback(self._encode_batch, room)
            return self._encode_batch(replies)
        refused = admit(1) if admit is not None else None
        if refused is not None:
            self._observe(None, refused.code)
            id_ = message.get("id", _MISSING) if isinstance(message, dict) else None
            if id_ is _MISSING:
                return None
            return self._encode_single(error_response(refused, id_ if _valid_id(id_) else None))
        reply = self._call(message, context)
        if is_deferred(reply):
            return reply.addCallback(self._encode_single, room)
        return self._encode_single(reply)

    def _call_all(self, requests: list, context: Any) -> list | Deferred:
        """The replies of a batch's ``requests``, called in order: each reply object, or a
        Deferred of it. Once an ordered method's call answers later, the calls after it wait for
        its answer: then a Deferred of all the replies, every one of them there."""
        replies: list = []
        for index, request in enumerate(requests):
            reply = self._call(request, context)
            replies.append(reply)
            if isinstance(reply, Deferred) and not reply.called and self._ordered(request):
                return Deferred.fromCoroutine(self._after(replies, requests[index + 1:], context))
        return replies

    def _ordered(self, request: dict) -> bool:
        method = self._methods.get(request["method"])
        return method is not None and method.ordered

    async def _after(self, replies: list, rest: list, context: Any) -> list:
        """``replies`` with those of ``rest``, whose calls start once the last of ``replies`` (an
        ordered method's) has answered."""
        replies[-1] = await replies[-1]  # never fails: _call answers failures itself
        later = self._call_all(rest, context)
        if isinstance(later, Deferred):
            later = await later
        return await gatherResults([r if isinstance(r, Deferred) else succeed(r) for r in replies + later],
                                   consumeErrors=True)

    def _call(self, request: Any, context: Any) -> dict | None | Deferred:
        """The reply object for one request (None for a notification), or a Deferred of it
        when the method answers later. Synchronous methods cost no Deferred at all."""
        if not isinstance(request, dict):
            self._observe(None, INVALID_REQUEST)
            return error_response(RPCError(INVALID_REQUEST, "Invalid Request: expected an object"))
        id_ = request.get("id", _MISSING)
        is_notification = id_ is _MISSING
        if not is_notification and not _valid_id(id_):
            self._observe(None, INVALID_REQUEST)
            return error_response(RPCError(INVALID_REQUEST, "Invalid Request: id must be a string, number or null"))
        reply_id = None if is_notification else id_
        if request.get("jsonrpc") != "2.0":
            self._observe(None, INVALID_REQUEST)
            return error_response(RPCError(INVALID_REQUEST, "Invalid Request: jsonrpc must be \"2.0\""), reply_id)
        name = request.get("method")
        if not isinstance(name, str):
            self._observe(None, INVALID_REQUEST)
            return error_response(RPCError(INVALID_REQUEST, "Invalid Request: method must be a string"), reply_id)
        params = request.get("params")
        if "params" in request and not isinstance(params, (list, dict)):
            self._observe(None, INVALID_REQUEST)
            return error_response(RPCError(INVALID_REQUEST, "Invalid Request: params must be an array or an object"),
                                  reply_id)
        method = self._methods.get(name)
        if method is None:
            self._observe(name, METHOD_NOT_FOUND)
            return None if is_notification else error_response(RPCError(METHOD_NOT_FOUND, "Method not found"), id_)

        try:
            result = method.call(context, params)
        except RPCError as e:  # the usual refusals: no Failure (and its traceback) to build
            return self._refused(e, name, id_)
        except Exception:
            return self._failed(Failure(), name, id_)
        if is_deferred(result):
            return result.addCallbacks(self._succeeded, self._failed, callbackArgs=(name, id_), errbackArgs=(name, id_))
        return self._succeeded(result, name, id_)

    def _succeeded(self, value: Any, name: str, id_: Any) -> dict | None:
        self._observe(name, "ok")
        return None if id_ is _MISSING else {"jsonrpc": "2.0", "result": value, "id": id_}

    def _failed(self, failure: Failure, name: str, id_: Any) -> dict | None:
        if isinstance(failure.value, RPCError):
            return self._refused(failure.value, name, id_)
        if failure.check(CancelledError):
            # The caller cancelled the method's Deferred (its connection closed): nobody is
            # left to answer, and nothing went wrong.
            self._observe(name, CANCELLED)
            return None
        log.failure("unhandled error in JSON-RPC method {method}", failure, method=name)
        return self._refused(RPCError(INTERNAL_ERROR, "Internal error"), name, id_)

    def _refused(self, error: RPCError, name: str, id_: Any) -> dict | None:
        """The error reply for a failed method (None for a notification: id_ is _MISSING)."""
        self._observe(name, error.code)
        return None if id_ is _MISSING else error_response(error, id_)


    # --- replies, within the size limit ---

    def _bound(self, room: ReplyRoom | None) -> tuple[int | None, Callable[[int], RPCError]]:
        """The size a reply must fit in (None: any), and the error that replaces one that does not."""
        left = None if room is None else room.left()
        if left is None or (self._max_reply is not None and left >= self._max_reply):
            return self._max_reply, self._too_large
        assert room is not None  # left is None without a room
        return max(left, 0), room.refuse

    @staticmethod
    def _size(text: str, limit: int | None) -> int | None:
        """None if ``text`` fits in ``limit`` bytes, else its UTF-8 size. Free for all but huge replies."""
        # Up to a quarter of the limit in characters, a reply fits whatever they are (4 UTF-8 bytes at most each).
        if limit is None or len(text) <= limit // 4:
            return None
        size = len(text.encode("utf-8"))
        return size if size > limit else None

    def _encode_single(self, reply: dict | None, room: ReplyRoom | None = None) -> str | None:
        if reply is None:
            return None
        text = encode(reply)
        limit, too_large = (self._max_reply, self._too_large) if room is None else self._bound(room)
        size = self._size(text, limit)
        if size is None:
            return text
        error = encode(error_response(too_large(size), reply["id"]))
        if self._size(error, limit) is not None:
            assert limit is not None  # too large for no limit: never
            raise ReplyTooLarge(size, limit)
        return error

    def _encode_batch(self, replies: list, room: ReplyRoom | None = None) -> str | None:
        answered = [r for r in replies if r is not None]
        if not answered:
            return None
        text = encode(answered)
        limit, too_large = (self._max_reply, self._too_large) if room is None else self._bound(room)
        return text if limit is None or self._size(text, limit) is None else self._shrink_batch(answered, limit, too_large)

    @staticmethod
    def _shrink_batch(answered: list, limit: int, too_large: Callable[[int], RPCError]) -> str:
        """The batch with its largest responses replaced by ``too_large`` errors until it fits."""
        parts = [encode(reply) for reply in answered]
        sizes = [len(part.encode("utf-8")) for part in parts]
        total = sum(sizes) + len(parts) + 1  # the brackets and the commas
        for i in sorted(range(len(parts)), key=sizes.__getitem__, reverse=True):
            if total <= limit:
                break
            error = encode(error_response(too_large(sizes[i]), answered[i]["id"]))
            size = len(error.encode("utf-8"))
            if size < sizes[i]:
                parts[i], total = error, total - sizes[i] + size
        if total > limit:
            raise ReplyTooLarge(total, limit)
        return "[" + ",".join(parts) + "]"


def encode(reply: dict | list) -> str:
    """Serialise a reply; a result that cannot be serialised becomes -32603 for its request.

    What orjson refuses goes through ``json`` with non-ASCII escaped as \\uXXXX: a str may
    hold lone surrogates (an id sent as "\\ud800" is valid JSON), and those cannot be encoded
    into a UTF-8 text frame; integers beyond 64 bits keep every digit.
    """
    try:
        return orjson.dumps(reply).decode("utf-8")
    except TypeError:
        pass
    try:
        return _ENCODER.encode(reply)
    except (TypeError, ValueError):
        log.failure("JSON-RPC result could not be serialised")
        replies = reply if isinstance(reply, list) else [reply]
        fixed = [_serialisable(r) for r in replies]
        return _ENCODER.encode(fixed if isinstance(reply, list) else fixed[0])


def _serialisable(reply: dict) -> dict:
    try:
        _ENCODER.encode(reply)
        return reply
    except (TypeError, ValueError):
        return error_response(RPCError(INTERNAL_ERROR, "Internal error"), reply.get("id"))
