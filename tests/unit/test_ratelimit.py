"""The token bucket behind the rate limit (picchat/ratelimit.py): exact values."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from picchat.ratelimit import TokenBucket


def test_a_new_bucket_is_full():
    bucket = TokenBucket(rate=2.0, burst=5, now=100.0)
    assert bucket.available(100.0) == 5
    assert bucket.wait(100.0) == 0.0


def test_take_takes_one_token_until_none_is_left():
    bucket = TokenBucket(rate=1.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.available(0.0) == 0
    assert bucket.tokens == 0.0  # a refused take costs nothing


def test_refill_is_rate_per_second_in_whole_tokens():
    bucket = TokenBucket(rate=4.0, burst=10, now=0.0)
    bucket.spend(10)
    assert bucket.available(0.0) == 0
    assert bucket.available(0.2) == 0  # 0.8 of a token
    assert bucket.available(0.25) == 1
    assert bucket.available(1.0) == 4
    assert bucket.tokens == pytest.approx(4.0)


def test_refill_never_passes_the_burst():
    bucket = TokenBucket(rate=100.0, burst=7, now=0.0)
    bucket.spend(3)
    assert bucket.available(3600.0) == 7
    assert bucket.tokens == 7.0
    assert [bucket.take(3600.0) for _ in range(8)] == [True] * 7 + [False]


def test_spend_may_go_below_zero_and_the_debt_is_paid_by_time():
    # The server spends what a slice really read, which may be more than it had.
    bucket = TokenBucket(rate=10.0, burst=5, now=0.0)
    bucket.spend(8)
    assert bucket.tokens == -3.0
    assert bucket.available(0.0) < 1
    assert bucket.wait(0.0) == pytest.approx(0.4)  # 3 to pay back, then 1
    assert bucket.available(0.39) == 0
    assert bucket.available(0.4) == 1


@pytest.mark.parametrize(
    "rate, spent, expected",
    [(2.0, 1, 0.5), (4.0, 3, 0.25), (0.5, 1, 2.0), (8.0, 8, 0.125), (1.0, 11, 1.0)],
)
def test_wait_is_the_time_to_the_next_whole_token(rate, spent, expected):
    bucket = TokenBucket(rate=rate, burst=spent, now=0.0)
    bucket.spend(spent)  # empty
    assert bucket.wait(0.0) == expected


def test_wait_counts_the_part_of_a_token_already_there():
    bucket = TokenBucket(rate=2.0, burst=1, now=0.0)
    assert bucket.take(0.0)
    assert bucket.wait(0.0) == 0.5
    assert bucket.wait(0.25) == 0.25
    assert bucket.wait(0.5) == 0.0
    assert bucket.take(0.5)


def test_wait_is_zero_while_a_token_is_there():
    bucket = TokenBucket(rate=1.0, burst=2, now=0.0)
    bucket.spend(1)
    assert bucket.wait(0.0) == 0.0


def test_time_going_backwards_adds_no_tokens():
    bucket = TokenBucket(rate=10.0, burst=5, now=1000.0)
    bucket.spend(5)
    assert bucket.available(999.0) == 0
    assert bucket.available(500.0) == 0
    assert bucket.tokens == 0.0
    assert not bucket.take(0.0)


def test_after_the_clock_went_back_refilling_goes_on_from_there():
    # Not stalled until the clock passes the old time again (a wall clock
    # stepped back an hour must not stop an input for an hour).
    bucket = TokenBucket(rate=10.0, burst=5, now=5000.0)
    bucket.spend(5)
    assert bucket.available(1400.0) == 0
    assert bucket.wait(1400.0) == pytest.approx(0.1)
    assert bucket.available(1400.5) == 5
    # ... and the old time reached again adds nothing beyond the burst.
    assert bucket.available(5000.0) == 5


def test_reconfigure_changes_the_rate_from_then_on_and_caps_the_tokens():
    bucket = TokenBucket(rate=1.0, burst=10, now=0.0)
    bucket.reconfigure(rate=5.0, burst=4)
    assert bucket.tokens == 4.0  # cut to the new burst
    assert bucket.available(0.0) == 4
    bucket.spend(4)
    assert bucket.wait(0.0) == pytest.approx(0.2)  # the new rate
    assert bucket.available(0.2) == 1
    bucket.reconfigure(rate=5.0, burst=100)
    assert bucket.tokens == pytest.approx(1.0)  # a larger burst adds nothing by itself
    assert bucket.available(100.0) == 100


def test_a_burst_then_the_steady_rate():
    # 200 lines at once, then 50 per second: the defaults.
    bucket = TokenBucket(rate=50.0, burst=200, now=0.0)
    assert sum(bucket.take(0.0) for _ in range(300)) == 200
    now = 0.0
    for _ in range(1000):
        now += bucket.wait(now)
        assert bucket.take(now)
    assert now == pytest.approx(1000 / 50.0)


@pytest.mark.parametrize(
    "rate, burst, spent, now",
    [(0.7, 4, 9, 8.497), (0.1, 2, 10, 3.471), (0.3, 1, 9, 14.193), (1 / 3, 3, 4, 1.467)],
)
def test_waiting_exactly_wait_gives_a_token_despite_rounding(rate, burst, spent, now):
    # Cases where (1 - tokens) / rate alone falls a hair short of the token.
    bucket = TokenBucket(rate, burst, 0.0)
    bucket.spend(spent)
    w = bucket.wait(now)
    assert bucket.available(now + w) >= 1
    assert w == pytest.approx((1 - (burst - spent + now * rate)) / rate, abs=1e-9)


rates = st.sampled_from([0.1, 1 / 3, 0.7, 1.0, 7.0, 13.3, 50.0, 1000.0]) | st.floats(0.01, 10_000.0)
clocks = st.sampled_from([0.0, 1.0, 12345.678, 1.7e9]) | st.floats(0.0, 2e9)


@settings(max_examples=120, deadline=None)
@given(
    rate=rates,
    burst=st.integers(1, 500),
    start=clocks,
    steps=st.lists(
        st.tuples(st.sampled_from(["take", "spend", "wait"]), st.floats(-5.0, 5.0)),
        max_size=30,
    ),
)
def test_waiting_exactly_wait_always_gives_a_token(rate, burst, start, steps):
    """However the bucket got where it is: after ``wait(now)`` seconds there is
    a token (no timer that wakes to find none), and tokens stay within
    [-spent, burst]. Rounding must not leave the refill a hair short."""
    bucket = TokenBucket(rate, burst, start)
    now = start
    for op, dt in steps:
        now = max(0.0, now + dt)  # sometimes backwards
        before, stamp = bucket.tokens, bucket.stamp
        if op == "take":
            bucket.take(now)
        elif op == "spend":
            bucket.spend(3)
        else:
            w = bucket.wait(now)
            assert w >= 0.0
            assert bucket.available(now + w) >= 1, (now, w, bucket.tokens)
            now += w
        assert bucket.tokens <= burst
        if now <= stamp and op == "take":
            assert bucket.tokens <= before  # no time passed (or it went back): nothing added
    w = bucket.wait(now)
    assert bucket.available(now + w) >= 1
