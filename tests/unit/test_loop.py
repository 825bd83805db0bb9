"""The selectors reactor: readers, writers, timers, end-of-turn calls, signals.

Every wait is bounded: ``run_once`` always gets a timeout, and loops that wait
for an event give up after a fixed number of turns.
"""

from __future__ import annotations

import os
import signal
import socket

import pytest

import picchat.loop
from picchat.loop import Loop

TURNS = 50  # at most this many turns while waiting for something that is due now
WAIT = 2.0  # seconds one turn may wait for an event that is already under way


@pytest.fixture
def loop():
    lp = Loop()
    yield lp
    lp.close()


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def run_until(loop: Loop, done, turns: int = TURNS, timeout: float = WAIT) -> None:
    for _ in range(turns):
        if done():
            return
        loop.run_once(timeout)
    assert done(), "the loop did not get there"


def test_reader_fires_when_data_arrives(loop, pair):
    a, b = pair
    got = []
    loop.add_reader(a.fileno(), lambda: got.append(a.recv(100)))
    loop.run_once(0)
    assert got == []  # nothing to read yet
    b.send(b"ping")
    run_until(loop, lambda: got)
    assert got == [b"ping"]


def test_remove_reader_stops_callbacks(loop, pair):
    a, b = pair
    got = []
    loop.add_reader(a.fileno(), lambda: got.append(a.recv(100)))
    loop.remove_reader(a.fileno())
    b.send(b"ping")
    loop.run_once(0.05)
    assert got == []
    assert a.recv(100) == b"ping"  # the data was there; nobody was called


def test_writer_fires_when_writable(loop, pair):
    a, b = pair
    calls = []

    def writable():
        calls.append(a.send(b"pong"))
        loop.remove_writer(a.fileno())

    loop.add_writer(a.fileno(), writable)
    assert loop.has_writer(a.fileno())
    run_until(loop, lambda: calls)
    assert calls == [4]
    assert not loop.has_writer(a.fileno())
    assert b.recv(100) == b"pong"
    loop.run_once(0)
    assert calls == [4]


def test_reader_and_writer_on_one_fd(loop, pair):
    a, b = pair
    events = []
    loop.add_reader(a.fileno(), lambda: events.append(("r", a.recv(10))))
    loop.add_writer(a.fileno(), lambda: events.append("w"))
    b.send(b"x")
    run_until(loop, lambda: ("r", b"x") in events and "w" in events)
    loop.remove_writer(a.fileno())
    events.clear()
    b.send(b"y")
    run_until(loop, lambda: events)
    assert events == [("r", b"y")]


def test_forget_unregisters_everything(loop, pair):
    a, b = pair
    got = []
    loop.add_reader(a.fileno(), lambda: got.append("r"))
    loop.add_writer(a.fileno(), lambda: got.append("w"))
    loop.forget(a.fileno())
    loop.forget(a.fileno())  # twice is harmless
    b.send(b"x")
    loop.run_once(0.05)
    assert got == []


def test_a_callback_that_closes_another_fd_of_the_same_turn(loop):
    """An fd forgotten by an earlier callback of the turn is not served."""
    p1, p2 = socket.socketpair(), socket.socketpair()
    try:
        got = []

        def first():
            got.append("first")
            for s in (p1[0], p2[0]):
                loop.forget(s.fileno())

        loop.add_reader(p1[0].fileno(), first)
        loop.add_reader(p2[0].fileno(), first)
        p1[1].send(b"x")
        p2[1].send(b"x")
        run_until(loop, lambda: got)
        loop.run_once(0)
        assert got == ["first"]
    finally:
        for s in (*p1, *p2):
            s.close()


def test_timers_run_in_order_of_their_time(loop):
    order = []
    now = loop.time()
    loop.call_at(now - 1, lambda: order.append("c"))
    loop.call_at(now - 3, lambda: order.append("a"))
    loop.call_at(now - 2, lambda: order.append("b"))
    loop.call_at(now - 2, lambda: order.append("b2"))  # same time: in order of scheduling
    loop.run_once(0)
    assert order == ["a", "b", "b2", "c"]


def test_call_later_waits_for_its_time(loop):
    order = []
    loop.call_later(0.05, lambda: order.append("late"))
    loop.call_later(0.0, lambda: order.append("now"))
    loop.run_once(0)
    assert order == ["now"]
    run_until(loop, lambda: len(order) == 2)
    assert order == ["now", "late"]


def test_run_once_sleeps_until_the_next_timer(loop):
    fired = []
    start = loop.time()
    timer = loop.call_later(0.02, lambda: fired.append(loop.time()))
    run_until(loop, lambda: fired, timeout=10 * WAIT)
    assert fired[0] >= timer.when
    # it woke for the timer, not at the end of the (much longer) run_once timeout
    assert loop.time() - start < 10 * WAIT


def test_cancelled_timer_does_not_run(loop):
    order = []
    now = loop.time()
    t = loop.call_at(now - 1, lambda: order.append("cancelled"))
    loop.call_at(now - 0.5, lambda: order.append("kept"))
    t.cancel()
    loop.run_once(0)
    assert order == ["kept"]


def test_timer_cancelled_by_an_earlier_callback_of_the_turn_does_not_run(loop):
    order = []
    now = loop.time()
    later = loop.call_at(now - 1, lambda: order.append("cancelled"))
    loop.call_at(now - 2, lambda: (order.append("first"), later.cancel()))
    loop.run_once(0)
    assert order == ["first"]


def test_timer_cancelled_by_a_reader_of_the_turn_does_not_run(loop, pair):
    a, b = pair
    order = []
    timer = loop.call_at(loop.time() - 1, lambda: order.append("timer"))

    def readable():
        a.recv(10)
        order.append("reader")
        timer.cancel()

    loop.add_reader(a.fileno(), readable)
    b.send(b"x")
    run_until(loop, lambda: order)
    loop.run_once(0)
    assert order == ["reader"]


def test_cancelled_far_timer_does_not_hold_the_loop(loop):
    t = loop.call_later(3600, lambda: None)
    t.cancel()
    assert loop._next_timeout() is None


def test_cancel_after_running_is_harmless(loop):
    calls = []
    t = loop.call_at(loop.time() - 1, lambda: calls.append(1))
    loop.run_once(0)
    t.cancel()
    loop.run_once(0)
    assert calls == [1]


def test_call_soon_runs_at_the_end_of_the_turn(loop, pair):
    a, b = pair
    order = []

    def readable():
        a.recv(10)
        order.append("reader")
        loop.call_soon(lambda: order.append("soon"))

    loop.add_reader(a.fileno(), readable)
    loop.call_at(loop.time() - 1, lambda: order.append("timer"))
    b.send(b"x")
    run_until(loop, lambda: order)
    assert order == ["reader", "timer", "soon"]


def test_call_soon_from_call_soon_runs_in_the_same_turn(loop):
    order = []

    def first():
        order.append(1)
        loop.call_soon(lambda: order.append(2))

    loop.call_soon(first)
    turns = loop.turns
    loop.run_once(WAIT)  # must not wait: something is due
    assert order == [1, 2]
    assert loop.turns == turns + 1


def test_call_soon_on_an_idle_loop_does_not_wait(loop):
    done = []
    loop.call_soon(lambda: done.append(True))
    loop.run_once()  # no timeout: would block forever if call_soon did not count
    assert done == [True]


def test_call_when_quiet_waits_for_a_turn_with_nothing_ready(loop, pair):
    a, b = pair
    got = []
    loop.add_reader(a.fileno(), lambda: got.append(a.recv(10)))
    flushed = []
    b.send(b"1")
    loop.run_once(WAIT)
    loop.call_when_quiet(lambda: flushed.append(len(got)))
    b.send(b"2")  # more input before the next turn: it is read first
    loop.run_once(WAIT)
    assert got == [b"1", b"2"] and flushed == []
    loop.run_once()  # nothing ready: a poll that does not wait, then the callback
    assert flushed == [2]


def test_call_when_quiet_runs_within_its_bound_of_turns_under_steady_input(loop, pair):
    a, b = pair
    flushed = []

    def readable():
        a.recv(10)
        b.send(b"x")  # input that never stops
        if not flushed:
            flushed.append(0)
            loop.call_when_quiet(lambda: flushed.append(loop.turns))

    loop.add_reader(a.fileno(), readable)
    b.send(b"x")
    loop.run_once(WAIT)
    asked = loop.turns
    monotonic = loop.time
    loop.time = lambda: monotonic() - 1  # only the bound of turns can end it  # type: ignore
    for _ in range(picchat.loop.GATHER_TURNS + 1):
        loop.run_once(WAIT)
    assert flushed == [0, asked + picchat.loop.GATHER_TURNS]


def test_run_once_with_nothing_to_do_returns_after_its_timeout(loop):
    turns = loop.turns
    start = loop.time()
    loop.run_once(0.01)
    assert loop.turns == turns + 1
    assert loop.time() >= start


def test_run_and_stop(loop):
    count = []

    def tick():
        count.append(1)
        if len(count) == 3:
            loop.stop()
        else:
            loop.call_soon(tick)

    loop.call_soon(tick)
    loop.run()
    assert len(count) == 3


def test_signal_callback_runs_in_the_loop(loop):
    got = []
    loop.add_signal_handler(signal.SIGUSR1, lambda: got.append("usr1"))
    os.kill(os.getpid(), signal.SIGUSR1)
    assert got == []  # not inside the Python signal handler
    run_until(loop, lambda: got)
    assert got == ["usr1"]


def test_two_signals(loop):
    got = []
    loop.add_signal_handler(signal.SIGUSR1, lambda: got.append("usr1"))
    loop.add_signal_handler(signal.SIGUSR2, lambda: got.append("usr2"))
    os.kill(os.getpid(), signal.SIGUSR2)
    os.kill(os.getpid(), signal.SIGUSR1)
    run_until(loop, lambda: len(got) == 2)
    assert sorted(got) == ["usr1", "usr2"]


def test_close_restores_signal_handlers_and_wakeup_fd():
    def previous(signum, frame):
        pass

    old_handler = signal.signal(signal.SIGUSR1, previous)
    old_wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(old_wakeup)
    try:
        loop = Loop()
        loop.add_signal_handler(signal.SIGUSR1, lambda: None)
        assert signal.getsignal(signal.SIGUSR1) is not previous
        wakeup = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(wakeup)
        assert wakeup != old_wakeup
        loop.close()
        assert signal.getsignal(signal.SIGUSR1) is previous
        wakeup = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(wakeup)
        assert wakeup == old_wakeup
    finally:
        signal.signal(signal.SIGUSR1, old_handler)
        signal.set_wakeup_fd(old_wakeup)


def test_cancelled_timers_are_swept_out_of_the_heap_and_release_their_callbacks():
    from picchat.loop import Loop

    loop = Loop()
    try:
        held = []
        timers = [loop.call_later(3600, lambda i=i: held.append(i)) for i in range(10_000)]
        for t in timers[:-10]:
            t.cancel()
        assert timers[0].callback is not timers[-1].callback  # let go of what it held
        timers[0].callback()  # and calling it does nothing
        assert held == []
        # A storm of short connections: each brings a timer that is soon cancelled.
        smallest = len(loop._timers)
        for _ in range(20_000):
            loop.call_later(3600, lambda: None).cancel()
            smallest = min(smallest, len(loop._timers))
        assert smallest < 100  # swept once the heap had doubled, down to the live ones
        assert len(loop._timers) <= 2 * 10_000 + 64  # never more than twice what it held
        live = {entry[2] for entry in loop._timers if not entry[2].cancelled}
        assert set(timers[-10:]) <= live
    finally:
        loop.close()


def test_hurry_runs_the_when_quiet_callbacks_at_the_end_of_this_turn(loop, pair):
    a, b = pair
    flushed = []

    def readable():
        a.recv(10)
        b.send(b"x")  # input that never stops: only hurry ends the gathering
        loop.call_when_quiet(lambda: flushed.append(loop.turns))
        loop.hurry()

    loop.add_reader(a.fileno(), readable)
    b.send(b"x")
    loop.run_once(WAIT)
    assert flushed == [loop.turns]


def test_hurry_without_a_pending_callback_does_not_cut_the_next_gathering_short(loop, pair):
    a, b = pair
    loop.hurry()  # nothing pending: nothing to hurry
    flushed = []
    loop.add_reader(a.fileno(), lambda: a.recv(10))
    loop.call_when_quiet(lambda: flushed.append(True))
    b.send(b"x")
    loop.run_once(WAIT)  # input was ready: keep gathering
    assert flushed == []
    loop.run_once()
    assert flushed == [True]
