"""Several socket clients chatting through the real server (plain protocol)."""

from __future__ import annotations

import re

from .support import Client, StructuredClient, settled_client

CHAT_RE = re.compile(r"^(user\d+|watcher): (.*)$")
PER_CLIENT = 20


def chat_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if CHAT_RE.match(line)]


def test_welcome_names_the_guest_and_mentions_help(server, clients):
    c = Client(server.port, "c")
    clients.append(c)
    welcome = c.history[0]
    assert c.name is not None and re.fullmatch(r"guest\d+", c.name), welcome
    assert c.name in welcome and "/help" in welcome, welcome


def test_five_clients_every_line_reaches_every_other_in_server_order(server, clients):
    # One of the five comes over the Unix socket: same protocol, same room.
    plain = []
    for i in range(5):
        target = server.sock_path if i == 4 else server.port
        c = Client(target, f"user{i}")
        clients.append(c)
        plain.append(c)
    for i, c in enumerate(plain):
        c.nick(f"user{i}")
    # The watcher numbers nothing itself: it reads the seq the server gave each line.
    watcher = StructuredClient(server.port, name="watcher")
    clients.append(watcher)
    assert watcher.welcome["name"] == "watcher"

    # Everyone talks at once, without waiting for anything.
    for k in range(PER_CLIENT):
        for i, c in enumerate(plain):
            c.send_line(f"m{i}-{k}")

    total = 5 * PER_CLIENT
    order: list[tuple[int, str]] = []
    while len(order) < total:
        f = watcher.expect(type="msg")
        order.append((f["seq"], f"{f['from']}: {f['text']}"))
    seqs = [s for s, _ in order]
    assert seqs == sorted(seqs) and len(set(seqs)) == total, "the watcher saw seq out of order"
    # Per sender, the server kept the order in which that sender wrote.
    for i in range(5):
        mine = [line for _, line in order if line.startswith(f"user{i}: ")]
        assert mine == [f"user{i}: m{i}-{k}" for k in range(PER_CLIENT)]

    # A last line after everything: whatever a client got before it is all it will get.
    watcher.send({"type": "msg", "text": "end"})
    for i, c in enumerate(plain):
        c.expect(r"^watcher: end$", timeout=10)
        got = [line for line in chat_lines(c.history) if line != "watcher: end"]
        expected = [line for _, line in order if not line.startswith(f"user{i}: ")]
        assert got == expected, f"user{i} got the lines in another order (or an echo)"
        assert not any(line.startswith(f"user{i}: ") for line in c.history), "echo to sender"


def test_commands_nick_taken_who_help_quit(server, clients):
    a, b, c = (settled_client(server, server.port, n) for n in "abc")
    clients.extend([a, b, c])
    a.nick("alice")
    b.nick("bob")

    # A taken name is refused, whatever its case, with a line that says so.
    for attempt in ("alice", "ALICE"):
        b.send_line(f"/nick {attempt}")
        m = b.expect(r"^! (.*)$")
        assert "taken" in m.group(1) and "alice" in m.group(1).lower(), m.group(0)
    b.send_line("still bob")
    a.expect(r"^bob: still bob$")

    # A bad name is refused too.
    b.send_line("/nick has:colon")
    assert b.expect(r"^! ").string.startswith("! ")

    b.send_line("/who")
    m = b.expect(r"^\* (\d+) here: (.*)$")
    assert m.group(1) == "3"
    assert set(m.group(2).split(", ")) == {"alice", "bob", c.name}

    b.send_line("/help")
    m = b.expect(r"^\* Commands:")
    for cmd in ("/nick", "/who", "/help", "/quit"):
        assert cmd in m.string, m.string

    b.send_line("/nosuchthing")
    assert "unknown command" in b.expect(r"^! ").string

    # // sends a line that starts with a slash.
    b.send_line("//etc/passwd is a path")
    a.expect(r"^bob: /etc/passwd is a path$")

    c.send_line("/quit")
    c.expect(r"^\* Goodbye")
    assert c.read_until_eof() == [], "nothing after the goodbye"
    # The others hear that c left (in a presence summary).
    a.expect(rf"^\* .*\b{c.name}\b.* left$")
    b.expect(rf"^\* .*\b{c.name}\b.* left$")
    # And chatting goes on between the two that stayed.
    a.send_line("still here")
    b.expect(r"^alice: still here$")
