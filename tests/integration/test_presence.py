"""Joins and leaves are summed up, not announced one line per connection."""

from __future__ import annotations

import re
import time

from .support import Client, settled_client

BURST = 200
PART_RE = re.compile(r"^(?P<names>.+?)(?: and (?P<others>\d+) others?)? (?P<verb>joined|left)$")


def presence_counts(line: str) -> dict[str, int]:
    """'* a, b and 3 others joined; c left' -> {'joined': 5, 'left': 1}."""
    assert line.startswith("* "), line
    counts = {"joined": 0, "left": 0}
    for part in line[2:].split("; "):
        m = PART_RE.match(part)
        assert m, f"not a presence summary: {line!r}"
        shown = m.group("names").split(", ")
        counts[m.group("verb")] += len(shown) + int(m.group("others") or 0)
    return counts


def collect_presence(watcher: Client, verb: str, total: int, timeout: float) -> list[str]:
    """Presence lines until they add up to ``total`` joins (or leaves)."""
    lines: list[str] = []
    seen = 0
    deadline = time.monotonic() + timeout
    while seen < total:
        m = watcher.expect(rf"^\* .* {verb}\b", timeout=max(deadline - time.monotonic(), 0.0))
        lines.append(m.string)
        seen += presence_counts(m.string)[verb]
    assert seen == total, f"{seen} {verb}, expected {total}: {lines}"
    return lines


def test_burst_of_200_joins_and_leaves_is_summed_up(start_server, clients):
    # A 1 s interval: the burst takes a few tens of milliseconds, so it should
    # fall in one or two intervals even on a slow machine.
    server = start_server(presence="1.0")
    watcher = settled_client(server, server.port, "watcher")
    clients.append(watcher)

    burst = []
    for i in range(BURST):
        c = Client(server.port, f"burst{i}", welcome=False)
        clients.append(c)
        burst.append(c)
    names = set()
    for c in burst:  # every one of them is greeted under its own name
        names.add(c.expect(r"^\* Welcome to picchat! You are (\S+)\.").group(1))
    assert len(names) == BURST

    joined = collect_presence(watcher, "joined", BURST, timeout=10)
    assert len(joined) <= 3, f"{len(joined)} presence lines for {BURST} joins: {joined}"
    first = joined[0]
    assert re.match(r"^\* guest\d+(, guest\d+)* and \d+ others joined$", first), first
    # No presence line was a one-by-one announcement ("* guest7 joined").
    assert not [line for line in watcher.history if re.fullmatch(r"\* guest\d+ joined", line)]

    for c in burst:
        c.close()
        clients.remove(c)
    left = collect_presence(watcher, "left", BURST, timeout=10)
    assert len(left) <= 3, f"{len(left)} presence lines for {BURST} leaves: {left}"

    # The room is usable afterwards, and counts one member.
    watcher.send_line("/who")
    assert watcher.expect(r"^\* (\d+) here: ").group(1) == "1"
