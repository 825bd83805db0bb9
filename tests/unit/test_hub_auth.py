"""The hub with connections that need a token: /auth, the back-off, rotation.

Sans I/O: connections are ids, time is a number, and the I/O layer's part
(``continue_input`` while ``backlogged``, ``wake`` at ``wake_at``) is played
by the test."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from picchat.auth import Gate
from picchat.hub import Hub
from picchat.protocol import ClientConnection, encode_hello

TOKEN = b"0123456789abcdef0123456789abcdef"
OTHER = b"fedcba9876543210fedcba9876543210"
WRONG = b"wrong-wrong-wrong-wrong"
ASK = "* this server needs a token first: send /auth TOKEN"
REFUSED = "! this server needs a token first: send /auth TOKEN"
FAILED = "! authentication failed"
T0 = 1_764_072_000.0


class Net:
    """A hub whose remote connections need a token, and the test as its I/O layer."""

    def __init__(self, tokens=(TOKEN,), backoff_max: float = 30.0) -> None:
        self.hub = Hub(
            history_id="h1",
            history_limit=100,
            max_line=1024,
            max_queue=1 << 20,
            log_chat=False,
            gate=Gate(tokens, backoff_max),
        )

    def open(self, cid: int, address: str = "192.0.2.1:40000", auth: bool = True) -> list[str]:
        self.hub.open(cid, address, "tcp", None, auth)
        return self.lines(cid)

    def send(self, cid: int, data: bytes, now: float = T0) -> None:
        """Bytes arrive; the rest of a burst is handled as the server does it."""
        self.hub.receive(cid, data, now, 100, 1 << 16)
        self.drain(cid, now)

    def drain(self, cid: int, now: float = T0) -> None:
        while self.hub.backlogged(cid):
            self.hub.continue_input(cid, now, 100, 1 << 16)

    def wake(self, cid: int, now: float) -> None:
        self.hub.wake(cid, now)
        self.drain(cid, now)

    def read(self, cid: int) -> bytes:
        out = self.hub.output(cid)
        data = bytes(out)
        out.clear()
        return data

    def lines(self, cid: int) -> list[str]:
        return self.read(cid).decode().splitlines()

    def member(self, cid: int, address: str = "127.0.0.1:1") -> None:
        """A member that needs no token (loopback), shown to be plain."""
        self.open(cid, address, auth=False)
        self.send(cid, b"/who\n")
        self.settle()

    def settle(self) -> None:
        self.hub.take_presence()
        for cid in list(self.hub.peers):
            self.read(cid)

    def in_room(self, cid: int) -> bool:
        return cid in self.hub.room


@pytest.fixture
def net() -> Net:
    return Net()


# ---- before the token ---------------------------------------------------------------


def test_a_connection_that_needs_a_token_is_asked_for_it_and_is_not_in_the_room(net):
    net.member(1)
    assert net.open(2) == [ASK]
    assert net.hub.authenticating(2)
    assert not net.in_room(2)
    assert net.hub.members == 1
    assert net.hub.wake_at(2) is None
    assert not net.hub.backlogged(2)
    net.hub.take_presence()
    assert net.lines(1) == []  # nobody is told of it


def test_without_the_token_nothing_of_the_chat_reaches_it(net):
    net.member(1)
    net.open(2)
    net.member(3, "127.0.0.1:3")
    net.send(1, b"a secret plan\n")
    net.send(1, b"/nick alice\n")
    net.hub.post("backup", "finished", T0)
    net.hub.take_presence()
    assert net.lines(2) == []
    assert net.lines(3) == [
        "guest1: a secret plan",
        "* guest1 is now known as alice",
        "backup: finished",
    ]


def test_what_it_sends_before_the_token_is_refused_and_goes_nowhere(net):
    net.member(1)
    net.open(2)
    net.send(2, b"hello everyone\n/who\n/nick mallory\n\n")
    assert net.lines(2) == [REFUSED, REFUSED, REFUSED]
    net.hub.take_presence()
    assert net.lines(1) == []
    assert net.hub.authenticating(2)
    assert net.hub.room.names().names == ("guest1",)


def test_a_hello_before_the_token_ends_the_connection(net):
    net.open(2)
    net.send(2, encode_hello("bot") + b"/auth " + TOKEN + b"\n")
    out = net.read(2)
    assert out.startswith(b"PICCHAT/1 ")
    reply = json.loads(out.split(b" ", 1)[1])
    assert reply["type"] == "error" and reply["code"] == "auth_required"
    assert net.hub.should_close(2)
    assert not net.in_room(2)


def test_a_connection_that_leaves_before_its_token(net):
    net.member(1)
    net.open(2)
    net.send(2, b"")
    assert net.hub.should_close(2)
    net.hub.gone(2, "closed")
    net.hub.take_presence()
    assert net.lines(1) == []  # never joined: no leave either
    assert 2 not in net.hub.peers


# ---- a good token ---------------------------------------------------------------------


def test_a_good_token_admits_it(net):
    net.member(1)
    net.open(2)
    net.send(2, b"/auth " + TOKEN + b"\n")
    assert net.lines(2) == ["* Welcome to picchat! You are guest2. Type /help for commands."]
    assert not net.hub.authenticating(2)
    assert net.in_room(2)
    assert net.hub.wake_at(2) is None
    net.send(2, b"hi all\n")
    net.hub.take_presence()
    assert sorted(net.lines(1)) == ["* guest2 joined", "guest2: hi all"]
    net.send(1, b"welcome\n")
    assert net.lines(2) == ["guest1: welcome"]


def test_every_valid_token_admits():
    net = Net(tokens=(TOKEN, OTHER))
    net.open(2)
    net.send(2, b"/auth " + OTHER + b"\r\n")
    assert net.in_room(2)


def test_a_hello_pipelined_after_the_token(net):
    net.open(2)
    client = ClientConnection()
    net.hub.receive(2, b"/auth " + TOKEN + b"\n" + encode_hello("bot"), T0, 100, 1 << 16)
    assert net.in_room(2)
    assert net.hub.backlogged(2)  # the hello waits for the I/O layer's next turn
    net.drain(2)
    frames = client.receive_data(net.read(2))
    assert client.welcome is not None
    assert frames == [client.welcome]
    assert client.welcome["name"] == "bot"
    assert client.welcome["session"]
    assert client.last_plain.startswith("* Welcome to picchat!")


def test_chat_pipelined_after_the_token_is_handled_after_admission(net):
    net.member(1)
    net.open(2)
    net.hub.receive(2, b"/auth " + TOKEN + b"\nfirst\n/nick bob\nsecond\n", T0, 100, 1 << 16)
    net.hub.take_presence()
    assert net.lines(1) == []  # not yet: only the token was handled
    net.drain(2)
    chat = [line for line in net.lines(1) if not line.startswith("* ")]
    assert chat == ["guest2: first", "bob: second"]


def test_refusals_then_a_good_token(net):
    net.open(2)
    net.send(2, b"hello\n/auth " + TOKEN + b"\nhi\n")
    assert net.lines(2) == [
        REFUSED,
        "* Welcome to picchat! You are guest1. Type /help for commands.",
    ]
    assert net.in_room(2)
    assert net.hub.gate.remembered == 0  # a refused line is not a failed token


def test_a_token_then_the_end_of_input(net):
    net.member(1)
    net.open(2)
    net.send(2, b"/auth " + TOKEN + b"\nbye\n")
    net.send(2, b"")
    assert net.hub.should_close(2) is False  # its output is not flushed yet
    net.read(2)
    assert net.hub.should_close(2)
    assert not net.in_room(2)


def test_a_good_token_forgets_earlier_failures_of_its_address(net):
    net.open(2)
    net.send(2, b"/auth " + WRONG + b"\n", T0)
    net.open(3)
    net.send(3, b"/auth " + TOKEN + b"\n", T0 + 5)  # after the back-off
    assert net.in_room(3)
    assert net.hub.gate.wait("192.0.2.1", T0 + 5) == 0.0
    assert net.hub.gate.remembered == 0


# ---- a wrong token ---------------------------------------------------------------------


def test_a_wrong_token_is_answered_after_the_backoff_and_closed(net):
    net.member(1)
    net.open(2)
    net.send(2, b"/auth " + WRONG + b"\nhello\n", T0)
    assert net.hub.wake_at(2) == T0 + 1.0
    assert net.lines(2) == []  # no answer yet
    assert not net.hub.should_close(2)
    assert not net.hub.backlogged(2)  # held: read nothing from it
    net.wake(2, T0 + 0.5)  # too early: nothing
    assert net.hub.wake_at(2) == T0 + 1.0
    assert net.lines(2) == []
    net.wake(2, T0 + 1.0)
    assert net.lines(2) == [FAILED]  # and nothing else: no hint
    assert net.hub.wake_at(2) is None
    assert net.hub.should_close(2)
    assert not net.in_room(2)
    net.hub.take_presence()
    assert net.lines(1) == []  # "hello" went nowhere


def test_input_after_a_wrong_token_is_never_handled(net):
    net.member(1)
    net.open(2)
    net.send(2, b"/auth " + WRONG + b"\n", T0)
    net.send(2, b"/auth " + TOKEN + b"\nsneaky\n", T0 + 0.1)
    net.wake(2, T0 + 1)
    net.send(2, b"/auth " + TOKEN + b"\nsneakier\n", T0 + 2)
    assert net.lines(2) == [FAILED]
    net.hub.take_presence()
    assert net.lines(1) == []
    assert not net.in_room(2)


def test_an_empty_token_is_a_wrong_token(net):
    net.open(2)
    net.send(2, b"/auth\n")
    assert net.hub.wake_at(2) == T0 + 1.0
    assert not net.in_room(2)


def test_failures_from_one_address_double_the_backoff(net):
    now = T0
    for i, delay in enumerate([1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]):
        cid = 10 + i
        net.open(cid, f"192.0.2.1:{50000 + i}")
        net.send(cid, b"/auth " + WRONG + b"\n", now)
        assert net.hub.wake_at(cid) == now + delay
        now += delay
        net.wake(cid, now)
        assert net.lines(cid) == [FAILED]


def test_the_backoff_maximum_is_the_gates():
    net = Net(backoff_max=3.0)
    for i, delay in enumerate([1.0, 2.0, 3.0, 3.0]):
        net.open(i, f"192.0.2.1:{i}")
        net.send(i, b"/auth " + WRONG + b"\n", T0 + 100 * i)
        assert net.hub.wake_at(i) == T0 + 100 * i + delay


def test_an_attempt_during_the_backoff_waits_for_its_end_even_a_good_one(net):
    net.open(2, "192.0.2.1:1000")
    net.send(2, b"/auth " + WRONG + b"\n", T0)
    net.open(3, "192.0.2.1:1001")  # another connection from the same address
    net.send(3, b"/auth " + TOKEN + b"\nhi\n", T0 + 0.25)
    assert net.hub.wake_at(3) == T0 + 1.0  # held, not judged
    assert net.hub.authenticating(3)
    assert not net.in_room(3)
    assert net.lines(3) == []
    net.wake(3, T0 + 1.0)
    assert net.in_room(3)
    assert net.lines(3) == ["* Welcome to picchat! You are guest1. Type /help for commands."]
    assert net.hub.room.history[-1].text == "hi"  # its pipelined line, once admitted


def test_a_held_wrong_token_counts_as_the_next_failure(net):
    net.open(2, "192.0.2.1:1000")
    net.send(2, b"/auth " + WRONG + b"\n", T0)
    net.open(3, "192.0.2.1:1001")
    net.send(3, b"/auth " + WRONG + b"\n", T0 + 0.5)
    assert net.hub.wake_at(3) == T0 + 1.0
    net.wake(2, T0 + 1.0)
    net.wake(3, T0 + 1.0)  # judged now: fails, answered after two more seconds
    assert net.hub.wake_at(3) == T0 + 3.0
    assert net.lines(3) == []
    net.wake(3, T0 + 3.0)
    assert net.lines(3) == [FAILED]


def test_many_connections_from_one_address_still_get_one_guess_per_backoff(net, monkeypatch):
    """However many connections an address opens, its guesses are judged one
    per back-off: those held together are not all judged when it ends."""
    clock = [T0]
    judged: list[float] = []  # when each token was checked
    check = net.hub.gate.check
    monkeypatch.setattr(net.hub.gate, "check", lambda t: judged.append(clock[0]) or check(t))
    net.open(1, "192.0.2.1:1000")
    net.send(1, b"/auth " + WRONG + b"\n", T0)
    held = range(2, 7)
    for cid in held:
        net.open(cid, f"192.0.2.1:{1000 + cid}")
        net.send(cid, b"/auth " + WRONG + b"\n", T0 + 0.5)
        assert net.hub.wake_at(cid) == T0 + 1.0
    assert judged == [T0]
    pending = {1, *held}
    while pending:  # the I/O layer's timers, earliest first
        cid = min(pending, key=lambda c: (net.hub.wake_at(c), c))
        clock[0] = net.hub.wake_at(cid)
        net.wake(cid, clock[0])
        if net.hub.wake_at(cid) is None:
            pending.discard(cid)
    assert [t - T0 for t in judged] == [0.0, 1.0, 3.0, 7.0, 15.0, 31.0]
    for cid in [1, *held]:
        assert net.lines(cid) == [FAILED]


def test_another_address_is_not_held(net):
    net.open(2, "192.0.2.1:1000")
    net.send(2, b"/auth " + WRONG + b"\n", T0)
    net.open(3, "198.51.100.7:1000")
    net.send(3, b"/auth " + TOKEN + b"\n", T0 + 0.1)
    assert net.hub.wake_at(3) is None
    assert net.in_room(3)
    net.open(4, "198.51.100.8:1000")
    net.send(4, b"/auth " + WRONG + b"\n", T0 + 0.1)
    assert net.hub.wake_at(4) == T0 + 1.1  # its own first failure


@pytest.mark.parametrize(
    ("first", "second", "shared"),
    [
        ("192.0.2.1:1000", "192.0.2.1:2000", True),
        ("[2001:db8::1]:1000", "[2001:db8::1]:2000", True),
        ("192.0.2.1:1000", "192.0.2.2:1000", False),
        ("[2001:db8::1]:1000", "[2001:db8::2]:1000", False),
    ],
)
def test_the_backoff_is_per_host_not_per_port(net, first, second, shared):
    net.open(2, first)
    net.send(2, b"/auth " + WRONG + b"\n", T0)
    net.open(3, second)
    net.send(3, b"/auth " + TOKEN + b"\n", T0)
    assert (net.hub.wake_at(3) is not None) is shared
    assert net.in_room(3) is not shared


def test_a_held_connection_that_goes_away(net):
    net.open(2)
    net.send(2, b"/auth " + WRONG + b"\n", T0)
    net.hub.gone(2, "reset by peer")
    assert net.hub.wake_at(2) is None
    net.hub.wake(2, T0 + 5)  # a timer that fires late: no error
    assert 2 not in net.hub.peers


def test_an_unterminated_token_and_the_end_of_input_while_held(net):
    net.member(1)
    net.open(2, "192.0.2.1:1000")
    net.send(2, b"/auth " + WRONG + b"\n", T0)
    net.open(3, "192.0.2.1:1001")
    net.send(3, b"/auth " + TOKEN, T0 + 0.5)  # no newline: the peer then shuts down writing
    net.send(3, b"", T0 + 0.5)
    assert net.hub.wake_at(3) == T0 + 1.0
    net.wake(3, T0 + 1.0)
    # Admitted, then its end of input is handled: it leaves, and is closed.
    assert not net.in_room(3)
    assert net.lines(3) == ["* Welcome to picchat! You are guest2. Type /help for commands."]
    assert net.hub.should_close(3)


def test_the_token_is_never_logged(net, logged):
    logged.set_level(logging.DEBUG)
    net.open(2, "192.0.2.1:1000")
    net.send(2, b"/auth " + WRONG + b"\n", T0)
    net.open(3, "192.0.2.1:1001")
    net.send(3, b"/auth " + TOKEN + b"\n", T0 + 0.5)
    net.wake(2, T0 + 1)
    net.wake(3, T0 + 1)
    net.open(4, "198.51.100.1:1")
    net.send(4, b"/auth " + TOKEN + b"\n", T0 + 2)
    assert "Failed authentication from 192.0.2.1:1000" in logged.text
    assert "198.51.100.1:1 authenticated" in logged.text
    for record in logged.records:
        text = record.getMessage()
        assert TOKEN.decode() not in text and WRONG.decode() not in text
        assert not record.exc_text


def test_a_failure_is_logged_at_notice_level(net, logged):
    logged.set_level(logging.DEBUG)
    net.open(2, "192.0.2.1:1000")
    net.send(2, b"/auth " + WRONG + b"\n", T0)
    [record] = [r for r in logged.records if "Failed authentication" in r.getMessage()]
    assert logging.INFO < record.levelno < logging.WARNING


# ---- rotation and the rest -------------------------------------------------------------


def test_rotating_tokens_keeps_authenticated_connections(net):
    net.open(2)
    net.send(2, b"/auth " + TOKEN + b"\n")
    net.open(3, "198.51.100.1:1")
    net.send(3, b"/auth " + TOKEN + b"\n" + encode_hello("bot"))
    net.settle()
    net.hub.set_tokens([OTHER])
    assert net.in_room(2) and net.in_room(3)
    net.send(2, b"still here\n")
    assert net.read(3).endswith(b'"from":"guest1","text":"still here"}\n')
    net.open(4, "203.0.113.1:1")
    net.send(4, b"/auth " + TOKEN + b"\n", T0)  # the old token: refused now
    assert net.hub.wake_at(4) == T0 + 1
    net.open(5, "203.0.113.2:1")
    net.send(5, b"/auth " + OTHER + b"\n", T0)
    assert net.in_room(5)


def test_a_held_token_is_judged_against_the_tokens_of_when_it_wakes(net):
    net.open(2, "192.0.2.1:1000")
    net.send(2, b"/auth " + WRONG + b"\n", T0)
    net.open(3, "192.0.2.1:1001")
    net.send(3, b"/auth " + OTHER + b"\n", T0 + 0.5)  # not valid yet
    net.hub.set_tokens([TOKEN, OTHER])  # a reload meanwhile
    net.wake(3, T0 + 1)
    assert net.in_room(3)


def test_without_auth_a_token_line_is_ignored(net):
    net.member(1)
    net.open(2, "127.0.0.1:2", auth=False)
    assert not net.hub.authenticating(2)
    net.send(2, b"/auth " + TOKEN + b"\n" + encode_hello("bot"))
    client = ClientConnection()
    client.receive_data(net.read(2))
    assert client.welcome is not None and client.welcome["name"] == "bot"
    net.send(2, b'{"type":"msg","text":"hi"}\n')
    net.hub.take_presence()
    assert net.lines(1) == ["bot: hi", "* bot joined"]  # the token line never reached anyone
    assert net.hub.gate.remembered == 0


def test_without_auth_a_token_line_in_plain_chat_is_not_sent(net):
    net.member(1)
    net.member(2, "127.0.0.1:2")
    net.send(2, b"/auth " + TOKEN + b"\nhello\n")
    assert net.lines(1) == ["guest2: hello"]
    assert net.lines(2) == []


def test_shutdown_reaches_a_connection_still_waiting_for_its_token(net):
    net.open(2)
    net.hub.shutdown("The server is going down.")
    assert net.lines(2) == ["* The server is going down."]
    assert net.hub.should_close(2)


# ---- whatever it sends without the token -------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=6), st.booleans())
def test_without_the_token_nothing_it_sends_reaches_the_room(chunks, end):
    net = Net()
    net.member(1)
    net.open(2, "192.0.2.1:1000")
    now = T0
    for chunk in [*chunks, *([b""] if end else [])]:
        now += 0.5
        net.send(2, chunk, now)
        wake = net.hub.wake_at(2)
        if wake is not None:
            now = max(now, wake)
            net.wake(2, now)
    net.hub.take_presence()
    assert net.lines(1) == []
    assert not net.in_room(2)
    assert net.hub.room.seq == 0  # nothing was posted
    for line in net.lines(2):
        assert line in (REFUSED, FAILED) or line.startswith("PICCHAT/1 "), line
