"""A result that comes once, for any number of waiters.

A Deferred has one callback chain: whoever adds a callback changes what the next one gets, so
code that only wants to know when something happened (a port bound, a process ended, the
connections drained) had to copy the result into a Deferred of its own, each place its own way.
:class:`Once` holds the result and gives every waiter its own Deferred.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import AlreadyCalledError, Deferred, fail, succeed
from twisted.python.failure import Failure

_PENDING = object()


class Once:
    """A result (or a :class:`~twisted.python.failure.Failure`) that comes once.

    :meth:`when` gives a new Deferred that fires with it (at once if it came already);
    :meth:`fire` gives the result.
    """

    def __init__(self) -> None:
        self._result: Any = _PENDING
        self._waiters: list[Deferred] = []

    @property
    def fired(self) -> bool:
        """Whether the result came."""
        return self._result is not _PENDING

    @property
    def result(self) -> Any:
        """The result (or Failure) once it came, None before."""
        return None if self._result is _PENDING else self._result

    def when(self) -> Deferred:
        """A Deferred of its own that fires with the result, or fails with the Failure."""
        if self._result is _PENDING:
            d: Deferred = Deferred()
            self._waiters.append(d)
            return d
        return fail(self._result) if isinstance(self._result, Failure) else succeed(self._result)

    def fire(self, result: Any) -> None:
        """The result came: fire every waiter (a Failure fails them). Only once."""
        if self._result is not _PENDING:
            raise AlreadyCalledError(f"{self!r} fired already")
        self._result = result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


def pass_on(result: Any, to: Deferred) -> None:
    """Fire ``to`` with ``result`` (a value or a Failure), unless it fired already: a Deferred
    handed to a caller who may cancel it (or time it out) while the work behind it goes on. Used
    as ``work.addBoth(pass_on, answer)``; returns None, so ``work`` ends handled."""
    if to.called:
        return None
    if isinstance(result, Failure):
        to.errback(result)
    else:
        to.callback(result)
    return None
