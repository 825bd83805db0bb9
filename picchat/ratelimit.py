"""A token bucket, sans I/O: the rate limit of one input (a connection, the
FIFO, a serial line).

The limit is back-pressure, never loss: when a source has no token left, the
I/O layer stops reading it (a loop timer, not a sleep) until ``wait`` has
passed. The lines it has sent meanwhile wait in the kernel's buffers, and TCP
flow control slows the sender down; nothing it sent is dropped.
"""

from __future__ import annotations

import math


class TokenBucket:
    """``rate`` lines per second on average, up to ``burst`` at once."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def available(self, now: float) -> int:
        """Whole tokens now (refilled for the time since the last call).

        A clock that went back adds nothing; refilling goes on from there (it
        does not wait for the clock to pass the old time again)."""
        if now > self.stamp:
            self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return int(self.tokens)

    def spend(self, n: int) -> None:
        self.tokens -= n

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        if self.available(now) >= 1:
            self.tokens -= 1
            return True
        return False

    def wait(self, now: float) -> float:
        """Seconds until the next whole token: ``available(now + wait(now))``
        is at least 1."""
        if self.available(now) >= 1:
            return 0.0
        wait = (1.0 - self.tokens) / self.rate
        # Rounding may leave now + wait a hair short of the token: step up.
        step = math.ulp(max(abs(now), wait, 1.0))
        while self.tokens + ((now + wait) - now) * self.rate < 1.0:
            wait += step
            step *= 2
        return wait

    def reconfigure(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = min(self.tokens, float(burst))
