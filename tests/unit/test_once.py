"""``Once``: a result that comes once, each waiter with a Deferred of its own."""

from __future__ import annotations

import pytest
from twisted.internet.defer import AlreadyCalledError
from twisted.python.failure import Failure

from circles.common.once import Once


def results(d) -> list:
    seen: list = []
    d.addBoth(seen.append)
    return seen


def test_waiters_before_and_after_the_result_get_it():
    once = Once()
    assert not once.fired and once.result is None
    early = [results(once.when()) for _ in range(3)]
    assert early == [[], [], []]
    once.fire(42)
    assert once.fired and once.result == 42
    assert early == [[42], [42], [42]]
    assert results(once.when()) == [42]


def test_a_waiter_changing_its_result_changes_no_one_elses():
    """What the copying idiom was for: an observer's callbacks stay its own."""
    once = Once()
    first = once.when().addCallback(lambda result: "changed")
    second = results(once.when())
    once.fire("original")
    assert results(first) == ["changed"]
    assert second == ["original"]
    assert results(once.when()) == ["original"]


def test_a_failure_fails_every_waiter():
    once = Once()
    early = results(once.when())
    failure = Failure(ValueError("no"))
    once.fire(failure)
    for seen in (early, results(once.when())):
        assert isinstance(seen[0], Failure) and seen[0].check(ValueError)
        seen[0].trap(ValueError)  # handled: no unhandled error logged at collection
    assert once.result is failure


def test_a_waiter_added_while_firing_gets_the_result():
    once = Once()
    later: list = []
    once.when().addCallback(lambda result: later.append(results(once.when())))
    once.fire("x")
    assert later == [["x"]]


def test_fires_only_once():
    once = Once()
    once.fire(None)
    assert once.fired  # None is a result too
    with pytest.raises(AlreadyCalledError):
        once.fire(1)
    assert results(once.when()) == [None]
