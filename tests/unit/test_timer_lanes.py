"""Timer lanes (circles.common.timers): the timers of one delay behind one call of
the clock, each still firing at its own deadline. Driven by a ``Clock``: deadlines and counts of
calls, never durations."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from circles.common.timers import IDLE_LANES, TimerLane, TimerLanes
from circles.server.websocket import _Timers

from ..inmemory import captured_log


@pytest.fixture
def clock() -> Clock:
    return Clock()


def lane_of(clock: Clock, delay: float = 10.0) -> tuple[TimerLane, list]:
    fired: list = []
    return TimerLane(clock, delay, fired.append), fired


def test_timers_of_one_delay_share_one_call_of_the_clock(clock):
    lane, _ = lane_of(clock)
    for key in range(100):
        lane.set(key)
        clock.advance(0.01)
    assert len(lane) == 100
    assert len(clock.getDelayedCalls()) == 1


def test_each_timer_fires_at_its_own_deadline(clock):
    # Binary fractions throughout: the clock's sums are exact.
    lane, fired = lane_of(clock)
    lane.set("a")
    clock.advance(0.25)
    lane.set("b")
    clock.advance(0.5)
    lane.set("c")  # deadlines: a 10, b 10.25, c 10.75
    clock.advance(9.25 - 0.0078125)
    assert fired == []
    clock.advance(0.0078125)
    assert fired == ["a"]
    clock.advance(0.25 - 0.0078125)
    assert fired == ["a"]
    clock.advance(0.0078125)
    assert fired == ["a", "b"]
    clock.advance(0.5)
    assert fired == ["a", "b", "c"]
    assert len(lane) == 0 and clock.getDelayedCalls() == []


def test_a_reset_timer_fires_delay_after_the_reset(clock):
    lane, fired = lane_of(clock)
    lane.set("a")
    lane.set("b")
    clock.advance(5)
    lane.reset("a")  # now due at 15, after b
    clock.advance(5)
    assert fired == ["b"]
    clock.advance(4.9921875)
    assert fired == ["b"]
    clock.advance(0.0078125)
    assert fired == ["b", "a"]


def test_setting_a_timer_again_is_a_reset(clock):
    lane, fired = lane_of(clock)
    lane.set("a")
    clock.advance(6)
    lane.set("a")
    clock.advance(9.9921875)
    assert fired == []
    clock.advance(0.0078125)
    assert fired == ["a"]


def test_reset_of_a_timer_not_set_is_a_key_error(clock):
    lane, _ = lane_of(clock)
    with pytest.raises(KeyError):
        lane.reset("a")


def test_a_cancelled_timer_never_fires_and_the_last_leaves_its_call_until_it_comes(clock):
    lane, fired = lane_of(clock)
    lane.set("a")
    lane.set("b")
    lane.cancel("a")
    lane.cancel("a")  # again: nothing
    assert "a" not in lane and "b" in lane
    clock.advance(10)
    assert fired == ["b"]
    lane.set("c")
    lane.cancel("c")
    [call] = clock.getDelayedCalls()  # kept: a lane holding one timer at a time makes no call per timer
    clock.advance(4)
    lane.set("d")  # due at 24, after the call kept (at 20): no second call
    assert clock.getDelayedCalls() == [call]
    lane.cancel("d")
    lane.set("e")  # due at 24 too
    clock.advance(6)
    assert fired == ["b"] and "e" in lane and len(clock.getDelayedCalls()) == 1  # the call came, armed the next
    clock.advance(3.9921875)
    assert fired == ["b"]
    clock.advance(0.0078125)
    assert fired == ["b", "e"] and clock.getDelayedCalls() == []  # at its own deadline, nothing left behind
    lane.set("f")
    lane.cancel("f")
    clock.advance(10)
    assert fired == ["b", "e"] and clock.getDelayedCalls() == []  # the call came, fired nothing, armed nothing


def test_a_timer_that_raises_does_not_stop_the_others(clock):
    fired: list = []

    def fire(key):
        fired.append(key)
        if key == "a":
            raise RuntimeError("boom")

    lane = TimerLane(clock, 10, fire)
    lane.set("a")
    lane.set("b")
    clock.advance(1)
    lane.set("c")
    with captured_log() as events:
        clock.advance(9)
    assert fired == ["a", "b"]
    assert [e for e in events if e.get("log_failure") is not None]
    clock.advance(1)
    assert fired == ["a", "b", "c"]


def test_a_timer_set_as_another_fires_waits_its_whole_delay(clock):
    fired: list = []
    lane = TimerLane(clock, 10, lambda key: (fired.append((key, clock.seconds())), key == "a" and lane.set("again")))
    lane.set("a")
    clock.advance(2)
    lane.set("b")
    clock.advance(8)
    assert fired == [("a", 10)]
    clock.advance(2)
    assert fired == [("a", 10), ("b", 12)]
    clock.advance(8)
    assert fired == [("a", 10), ("b", 12), ("again", 20)]


def test_autobahns_timers_each_at_its_deadline_cancelling_twice_is_nothing(clock):
    timers = _Timers(clock)
    calls: list = []
    ping = timers.call_later(30, calls.append, "ping")
    pong = timers.call_later(3.5, lambda who, what: calls.append((who, what)), "pong", what="timeout")
    other = timers.call_later(30, calls.append, "other")
    assert len(clock.getDelayedCalls()) == 2  # a lane per delay
    other.cancel()
    clock.advance(3.4921875)
    assert calls == []
    clock.advance(0.0078125)
    assert calls == [("pong", "timeout")]
    pong.cancel()  # fired already: nothing
    clock.advance(26.5)
    assert calls == [("pong", "timeout"), "ping"]
    ping.cancel()
    other.cancel()
    assert clock.getDelayedCalls() == []


def test_lanes_one_per_delay_each_let_go_once_empty(clock):
    fired: list = []
    lanes = TimerLanes(clock, lambda key: fired.append((key, clock.seconds())))
    for key in range(50):
        lanes.set(30, key)
    lanes.set(0.5, "short")
    lanes.set(0.75, "shorter")
    assert len(lanes) == 3 and len(clock.getDelayedCalls()) == 3  # a call per delay, not per timer
    lanes.cancel(0.75, "shorter")  # its lane's last: kept, a few lanes held, until its call comes
    assert len(lanes) == 3 and len(clock.getDelayedCalls()) == 3
    lanes.cancel(0.75, "shorter")  # again: nothing
    clock.advance(0.5)
    assert fired == [("short", 0.5)] and len(lanes) == 2  # fired its lane's last: let go
    clock.advance(0.25)
    assert len(lanes) == 1 and len(clock.getDelayedCalls()) == 1  # its call came and found nothing: let go
    for key in range(49):
        lanes.cancel(30, key)
    assert len(lanes) == 1
    clock.advance(29.25)
    assert fired == [("short", 0.5), (49, 30)]
    assert len(lanes) == 0 and clock.getDelayedCalls() == []


def test_past_a_few_lanes_one_emptied_goes_at_once_with_its_call(clock):
    lanes = TimerLanes(clock, lambda key: None)
    for n in range(IDLE_LANES + 3):
        lanes.set(10 + n, n)
    assert len(lanes) == IDLE_LANES + 3 and len(clock.getDelayedCalls()) == IDLE_LANES + 3
    for n in range(IDLE_LANES + 3):
        lanes.cancel(10 + n, n)
    # let go at once while more than IDLE_LANES were held; the last IDLE_LANES wait for their call
    assert len(lanes) == IDLE_LANES and len(clock.getDelayedCalls()) == IDLE_LANES
    lanes.set(10 + IDLE_LANES + 2, "again")  # the same delay as a lane kept: that lane, no new call
    assert len(lanes) == IDLE_LANES and len(clock.getDelayedCalls()) == IDLE_LANES
    clock.advance(100)
    assert len(lanes) == 0 and clock.getDelayedCalls() == []


def test_distinct_delays_chosen_by_callers_leave_nothing_behind(clock):
    # Delays a client picks (a play's timeout): each costs a lane only while its timers wait.
    lanes = TimerLanes(clock, lambda key: None)
    for n in range(1000):
        lanes.set(1 + n / 1024, n)
    assert len(lanes) == 1000
    for n in range(0, 1000, 2):
        lanes.cancel(1 + n / 1024, n)
    clock.advance(2)
    assert len(lanes) == 0 and clock.getDelayedCalls() == []


def test_a_lane_whose_last_timer_raises_is_let_go_and_one_set_as_it_fires_still_fires(clock):
    fired: list = []

    def fire(key):
        fired.append((key, clock.seconds()))
        if key == "a":
            lanes.set(10, "again")  # the same delay, from inside its lane's firing
        if key == "b":
            raise RuntimeError("boom")

    lanes = TimerLanes(clock, fire)
    lanes.set(10, "a")
    clock.advance(10)
    assert len(lanes) == 1
    clock.advance(10)
    assert fired == [("a", 10), ("again", 20)] and len(lanes) == 0
    lanes.set(10, "b")
    with captured_log():
        clock.advance(10)
    assert len(lanes) == 0 and clock.getDelayedCalls() == []
