"""The hub through an in-memory pair: connections are ids, bytes go in and come out."""

from __future__ import annotations

import json

import pytest

import picchat.hub
from picchat.hub import HELP_TEXT, Hub
from picchat.protocol import ClientConnection, encode_hello, encode_request


class Net:
    """A hub and the connections to it, without sockets.

    ``open`` connects, ``send`` delivers bytes as if received, ``read`` takes
    (and clears) what the I/O layer would send to that connection.
    """

    def __init__(self, *, max_line=1024, max_queue=1 << 20, history_limit=100) -> None:
        self.hub = Hub(
            history_id="h1",
            history_limit=history_limit,
            max_line=max_line,
            max_queue=max_queue,
            log_chat=False,
        )
        self.now = 1_764_072_000.0

    def open(self, cid: int) -> bytes:
        self.hub.open(cid, "test")
        return self.read(cid)

    def send(self, cid: int, data: bytes) -> None:
        self.now += 1
        self.hub.receive(cid, data, self.now)

    def read(self, cid: int) -> bytes:
        out = self.hub.output(cid)
        data = bytes(out)
        out.clear()
        return data

    def lines(self, cid: int) -> list[str]:
        return self.read(cid).decode().splitlines()

    def frames(self, cid: int) -> list[dict]:
        return [json.loads(line) for line in self.read(cid).splitlines()]

    def presence(self) -> bool:
        return self.hub.take_presence()

    def settle(self) -> None:
        """Announce pending joins and leaves, and forget every queued output."""
        self.hub.take_presence()
        for cid in self.hub.peers:
            self.read(cid)

    def plain(self, cid: int) -> None:
        """Open a connection that has shown itself plain (a first line /who)."""
        self.open(cid)
        self.send(cid, b"/who\n")
        self.read(cid)

    def structured(self, cid: int, name: str | None = None, **hello) -> dict:
        """Open a structured connection; returns its welcome."""
        self.open(cid)
        client = ClientConnection()
        self.send(cid, encode_hello(name, **hello))
        frames = client.receive_data(self.read(cid))
        assert client.welcome is not None
        assert frames[0] is client.welcome
        return client.welcome


@pytest.fixture
def net() -> Net:
    return Net()


# ---- plain members ---------------------------------------------------------------------


def test_a_new_connection_is_greeted_in_plain(net):
    data = net.open(1)
    assert data.startswith(b"* Welcome to picchat! You are guest1.")
    assert data.endswith(b"\n")
    assert net.hub.members == 1


def test_two_plain_members_chat_in_order_without_echo(net):
    net.open(1)
    net.open(2)
    net.send(1, b"hello\r\nhow are you\n")
    net.send(1, b"still ")
    net.send(1, b"me\n")
    assert net.lines(2) == ["guest1: hello", "guest1: how are you", "guest1: still me"]
    assert net.read(1) == b""
    net.send(2, b"fine\n")
    assert net.lines(1) == ["guest2: fine"]
    assert net.read(2) == b""
    assert [m.seq for m in net.hub.room.history] == [1, 2, 3, 4]
    assert net.hub.messages == 4


def test_dirty_set_names_connections_with_output(net):
    net.open(1)
    net.open(2)
    net.hub.take_dirty()
    net.send(1, b"hi\n")
    assert net.hub.take_dirty() == {2}
    assert net.hub.take_dirty() == set()


def test_plain_nick_who_help(net):
    net.plain(1)
    net.plain(2)
    net.settle()
    net.send(1, b"/nick alice\n")
    assert net.lines(1) == ["* guest1 is now known as alice"]
    assert net.lines(2) == ["* guest1 is now known as alice"]
    net.send(2, b"/nick ALICE\n")
    [err] = net.lines(2)
    assert err.startswith("! ") and "taken" in err
    assert net.read(1) == b""
    net.send(2, b"/who\n")
    assert net.lines(2) == ["* 2 here: alice, guest2"]
    net.send(2, b"/help\n")
    assert net.lines(2) == [f"* {HELP_TEXT}"]
    net.send(2, b"/bogus\n")
    assert net.lines(2)[0].startswith("! unknown command /bogus")


def test_a_lone_newcomer_is_announced_to_the_others_only(net):
    net.plain(1)
    net.settle()
    net.open(2)
    assert net.presence() is False  # silent so far: held back one window
    assert net.presence() is True
    assert net.lines(1) == ["* guest2 joined"]
    assert net.read(2) == b""


def test_presence_is_announced_to_everyone(net):
    net.plain(1)
    net.settle()
    net.plain(2)
    net.plain(3)
    assert net.presence() is True
    assert net.lines(1) == ["* guest2 and guest3 joined"]
    assert net.lines(2) == ["* guest2 and guest3 joined"]
    assert net.lines(3) == ["* guest2 and guest3 joined"]
    net.hub.gone(3, "reset")
    assert net.presence() is True
    assert net.lines(1) == ["* guest3 left"]
    assert net.lines(2) == ["* guest3 left"]
    assert net.presence() is False


def test_quit_says_bye_then_closes(net):
    net.plain(1)
    net.plain(2)
    net.settle()
    net.send(1, b"/quit\nignored after quit\n")
    assert not net.hub.should_close(1)  # the goodbye is still queued
    assert net.lines(1) == ["* Goodbye."]
    assert net.hub.should_close(1)
    assert 1 not in net.hub.room
    assert net.read(2) == b""
    net.presence()
    assert net.lines(2) == ["* guest1 left"]


def test_input_after_quit_is_ignored(net):
    """A peer that said /quit but has not been closed yet may still send."""
    net.plain(1)
    net.plain(2)
    net.send(1, b"/quit\n")
    for data in (b"more\n", b"/nick zed\n", b"/who\n", b""):
        net.send(1, data)  # must not raise
    assert net.lines(1) == ["* Goodbye."]
    assert net.read(2) == b""
    assert net.hub.should_close(1)


def test_eof_closes(net):
    net.open(1)
    net.open(2)
    net.send(1, b"partial line")
    net.send(1, b"")
    assert net.hub.should_close(1)
    assert 1 not in net.hub.room
    assert net.lines(2) == ["guest1: partial line"]
    net.hub.gone(1, "closed")
    assert 1 not in net.hub.peers
    net.hub.gone(1, "closed")  # twice is harmless
    net.send(1, b"late\n")  # so is data for a connection that is gone


def test_too_long_line_is_answered_and_the_connection_stays():
    net = Net(max_line=64)
    net.plain(1)
    net.open(2)
    net.send(1, b"x" * 100 + b"\nok\n")
    [err] = net.lines(1)
    assert err.startswith("! ") and "64" in err
    assert net.lines(2) == ["guest1: ok"]
    assert not net.hub.should_close(1)


def test_post_from_the_fifo_reaches_everyone(net):
    net.plain(1)
    net.structured(2, "bot")
    net.hub.post("fifo", "disk full", net.now)
    assert net.lines(1) == ["fifo: disk full"]
    [f] = net.frames(2)
    assert (f["type"], f["from"], f["text"], f["seq"]) == ("msg", "fifo", "disk full", 1)


# ---- structured members and senders ----------------------------------------------------


def test_structured_member_gets_a_versioned_welcome_with_its_name(net):
    net.open(1)
    net.send(1, b'PICCHAT/1 {"name":"alice","client":"test"}\n')
    first, *rest = net.read(1).splitlines()
    assert first.startswith(b"PICCHAT/1 ")
    welcome = json.loads(first[len(b"PICCHAT/1 ") :])
    assert rest == []  # the welcome carries the name: no separate renamed frame
    assert welcome["type"] == "welcome"
    assert welcome["name"] == "alice"
    assert welcome["member"] is True
    assert welcome["history_id"] == "h1"
    assert welcome["seq"] == 0
    assert welcome["max_line"] == 1024
    assert 1 in net.hub.room
    assert net.hub.room.name_of(1) == "alice"


def test_structured_member_gets_acks_with_seq(net):
    net.plain(1)
    net.structured(2, "alice")
    net.send(2, encode_request({"type": "msg", "text": "one", "id": "a"}))
    net.send(2, encode_request({"type": "msg", "text": "two"}))  # no id: no ack
    net.send(2, encode_request({"type": "msg", "text": "three", "id": 3}))
    assert net.frames(2) == [
        {"type": "ack", "id": "a", "seq": 1},
        {"type": "ack", "id": "3", "seq": 3},
    ]
    assert net.lines(1) == ["alice: one", "alice: two", "alice: three"]


def test_structured_member_receives_json_frames(net):
    net.plain(1)
    net.structured(2, "alice")
    net.settle()
    net.send(1, b"hi alice\n")
    [msg] = net.frames(2)
    assert msg["type"] == "msg"
    assert (msg["from"], msg["text"], msg["seq"], msg["time"]) == ("guest1", "hi alice", 1, net.now)
    net.send(2, encode_request({"type": "who", "id": "w"}))
    assert net.frames(2) == [{"type": "names", "names": ["guest1", "alice"], "count": 2, "id": "w"}]
    net.send(2, encode_request({"type": "nick", "name": "guest1", "id": "n"}))
    [err] = net.frames(2)
    assert (err["type"], err["code"], err["id"]) == ("error", "name_taken", "n")
    net.send(2, b"garbage\n")
    [err] = net.frames(2)
    assert (err["type"], err["code"]) == ("error", "bad_frame")


def test_structured_welcome_seq_is_the_newest_message(net):
    net.plain(1)
    net.send(1, b"one\ntwo\n")
    assert net.structured(2)["seq"] == 2


def test_structured_member_with_a_taken_name_keeps_its_guest_name(net):
    net.plain(1)
    net.send(1, b"/nick alice\n")
    net.open(2)
    net.send(2, encode_hello("Alice"))
    client = ClientConnection()
    frames = client.receive_data(net.read(2))
    assert frames[0]["type"] == "welcome"
    assert frames[0]["name"] == "guest2"
    assert frames[1]["type"] == "error"
    assert frames[1]["code"] == "name_taken"


def test_structured_quit(net):
    net.structured(1, "alice")
    net.send(1, encode_request({"type": "quit"}))
    assert net.frames(1) == [{"type": "bye", "text": "Goodbye."}]
    assert net.hub.should_close(1)


def test_sender_is_not_a_member_and_is_never_announced(net):
    net.plain(1)
    net.plain(2)
    net.settle()
    welcome = net.structured(3, "cron", member=False, client="picchat-send")
    assert welcome["member"] is False
    assert welcome["name"] == "cron"
    assert 3 not in net.hub.room
    assert net.hub.members == 2
    assert net.presence() is False
    assert net.read(1) == b""
    assert net.read(2) == b""

    net.send(3, encode_request({"type": "msg", "text": "backup done", "id": "1"}))
    assert net.frames(3) == [{"type": "ack", "id": "1", "seq": 1}]
    assert net.lines(1) == ["cron: backup done"]
    assert net.lines(2) == ["cron: backup done"]

    net.send(3, encode_request({"type": "nick", "name": "x", "id": "2"}))
    [err] = net.frames(3)
    assert (err["code"], err["id"]) == ("not_member", "2")

    net.send(3, encode_request({"type": "who"}))
    [names] = net.frames(3)
    assert "cron" not in names["names"]

    net.send(3, b"")
    assert net.hub.should_close(3)
    net.hub.gone(3, "closed")
    assert net.presence() is False
    assert net.read(1) == b""


def test_sender_arriving_with_a_member_is_left_out_of_the_presence_line(net):
    net.plain(1)
    net.settle()
    net.plain(2)
    net.open(3)
    net.send(3, encode_hello("cron", member=False))
    net.read(3)
    assert net.presence() is True
    assert net.lines(1) == ["* guest2 joined"]


def test_a_silent_connection_is_held_back_one_window_so_a_late_sender_is_never_announced(net):
    net.plain(1)
    net.settle()
    net.open(2)
    assert net.presence() is False  # the window closed before its first line
    net.send(2, encode_hello("cron", member=False))
    net.read(2)
    assert net.presence() is False
    assert net.read(1) == b""


def test_a_listener_that_never_types_is_announced_one_window_late(net):
    net.plain(1)
    net.settle()
    net.open(2)
    assert net.presence() is False
    assert net.lines(1) == []
    assert net.presence() is True
    assert net.lines(1) == ["* guest2 joined"]


def test_sender_name_need_not_be_unique(net):
    net.plain(1)
    net.send(1, b"/nick cron\n")
    welcome = net.structured(2, "cron", member=False)
    assert welcome["name"] == "cron"


def test_sender_with_an_invalid_name_is_refused(net):
    net.plain(1)
    net.open(2)
    net.send(2, encode_hello("bad name", member=False))
    data = net.read(2)
    assert data.startswith(b"PICCHAT/1 ")
    assert json.loads(data[len(b"PICCHAT/1 ") :])["code"] == "bad_name"
    assert net.hub.should_close(2)
    assert 2 not in net.hub.room


def test_version_mismatch_is_refused_with_a_versioned_error(net):
    net.plain(1)
    net.open(2)
    net.send(2, b'PICCHAT/2 {"name":"future"}\n')
    data = net.read(2)
    assert data.startswith(b"PICCHAT/1 ")
    assert data.count(b"\n") == 1
    err = json.loads(data[len(b"PICCHAT/1 ") :])
    assert (err["type"], err["code"]) == ("error", "version")
    assert net.hub.should_close(2)
    assert 2 not in net.hub.room
    client = ClientConnection()
    assert client.receive_data(data)[0]["code"] == "version"


def test_shutdown_says_bye_to_everyone(net):
    net.plain(1)
    net.structured(2, "bot")
    net.structured(3, "cron", member=False)
    net.hub.shutdown("Server is shutting down. Bye!")
    assert net.lines(1) == ["* Server is shutting down. Bye!"]
    assert net.frames(2) == [{"type": "bye", "text": "Server is shutting down. Bye!"}]
    assert net.frames(3) == [{"type": "bye", "text": "Server is shutting down. Bye!"}]
    assert all(net.hub.should_close(cid) for cid in (1, 2, 3))


# ---- bounded output ------------------------------------------------------------------------


def test_a_peer_that_never_reads_is_disconnected_and_others_still_receive():
    net = Net(max_line=1024, max_queue=4096)
    net.plain(1)  # never drained from here on
    net.plain(2)
    net.plain(3)
    net.settle()
    line = b"y" * 1000
    received = []
    for _ in range(5):  # 5 x 1009 bytes: past max_queue, within the hard bound
        net.send(3, line + b"\n")
        received.extend(net.lines(2))
        assert net.hub.check_behind(2) is False  # drained: not behind
    assert received == ["guest3: " + line.decode()] * 5
    assert net.hub.take_doomed() == []  # over max_queue, but no send was tried yet
    assert net.hub.check_behind(1) is True  # the I/O layer asks after a send attempt
    doomed = net.hub.take_doomed()
    assert [cid for cid, _ in doomed] == [1]
    assert "too slow" in doomed[0][1]
    assert net.hub.take_doomed() == []
    assert 1 not in net.hub.room
    assert net.hub.output(1) == b""
    net.hub.gone(1, doomed[0][1])
    net.presence()
    assert net.lines(2) == ["* guest1 left"]
    assert net.lines(3) == ["* guest1 left"]


def test_a_doomed_peer_is_ignored_until_it_is_gone():
    net = Net(max_line=1024, max_queue=4096)
    net.open(1)
    net.open(2)
    for _ in range(10):  # past the hard bound (2 x max_queue) within one turn
        net.send(2, b"z" * 1000 + b"\n")
    net.hub.take_dirty()  # the end of the turn: the chat is queued
    assert [cid for cid, _ in net.hub.take_doomed()] == [1]
    net.send(1, b"hello from the dead\n")
    assert net.read(2) == b""
    assert net.hub.messages == 10


def test_replies_that_overflow_the_queue_doom_the_peer():
    net = Net(max_line=1024, max_queue=4096)
    net.plain(1)
    for cid in range(2, 300):
        net.open(cid)
    # /who answers with up to 200 names, more than 4096 bytes with the rest queued
    for _ in range(5):
        net.send(1, b"/who\n")
    assert [cid for cid, _ in net.hub.take_doomed()] == [1]
    assert 1 not in net.hub.room


# ---- encoding once per wire format -------------------------------------------------------


@pytest.fixture
def encode_calls(monkeypatch) -> list:
    calls = []
    real = picchat.hub.encode

    def counting(frame, wire):
        calls.append((frame, wire))
        return real(frame, wire)

    monkeypatch.setattr(picchat.hub, "encode", counting)
    return calls


def test_a_broadcast_to_100_plain_members_is_encoded_once(net, encode_calls):
    for cid in range(100):
        net.open(cid)
    encode_calls.clear()
    net.hub.post("fifo", "to all", net.now)
    net.hub.take_dirty()  # the end of the turn: the chat is queued
    assert len(encode_calls) == 1
    assert all(net.lines(cid) == ["fifo: to all"] for cid in range(100))


def test_a_message_from_a_member_to_99_others_is_encoded_once(net, encode_calls):
    for cid in range(100):
        net.open(cid)
    encode_calls.clear()
    net.send(0, b"hi all\n")
    net.hub.take_dirty()
    assert len(encode_calls) == 1
    assert all(net.lines(cid) == ["guest1: hi all"] for cid in range(1, 100))


def test_a_broadcast_to_plain_and_json_members_is_encoded_twice(net, encode_calls):
    for cid in range(90):
        net.open(cid)
    for cid in range(90, 100):
        net.structured(cid, f"bot{cid}")
    encode_calls.clear()
    net.hub.post("fifo", "to all", net.now)
    net.hub.take_dirty()
    assert sorted(w.value for _, w in encode_calls) == ["json", "plain"]
    assert all(net.lines(cid) == ["fifo: to all"] for cid in range(90))
    assert all(net.frames(cid)[0]["text"] == "to all" for cid in range(90, 100))


def test_a_presence_line_for_many_is_encoded_once_per_format(net, encode_calls):
    for cid in range(50):
        net.plain(cid)
    for cid in range(50, 60):
        net.structured(cid)
    net.settle()
    for cid in range(60, 160):
        net.open(cid)
    assert net.presence() is False  # all silent so far: held back one window
    encode_calls.clear()
    assert net.presence() is True
    assert len(encode_calls) == 2
    assert all(len(net.lines(cid)) == 1 for cid in range(50))
    assert all(len(net.lines(cid)) == 1 for cid in range(60, 160))
    assert all(net.frames(cid)[0]["joined_count"] == 100 for cid in range(50, 60))


def test_the_lines_of_a_turn_reach_each_member_in_one_append(net, monkeypatch):
    for cid in range(1, 51):
        net.open(cid)
    net.settle()
    appends = []
    real = Hub._append

    def counting(self, peer, data, leave=True):
        appends.append(peer.cid)
        return real(self, peer, data, leave)

    monkeypatch.setattr(Hub, "_append", counting)
    net.send(1, b"".join(b"line %d\n" % i for i in range(40)))
    net.send(1, b"".join(b"line %d\n" % i for i in range(40, 60)))  # another recv()
    net.hub.take_dirty()  # the end of the turn
    assert sorted(appends) == list(range(2, 51))  # once per member but the sender
    want = [f"guest1: line {i}" for i in range(60)]
    assert all(net.lines(cid) == want for cid in range(2, 51))
    assert net.read(1) == b""


def test_chat_in_one_receive_keeps_its_order_with_what_comes_between(net):
    net.plain(1)
    net.plain(2)
    net.structured(3, "bot")
    net.settle()
    net.send(1, b"one\ntwo\n/nick alice\nthree\n/who\nfour\n")
    assert net.lines(2) == [
        "guest1: one",
        "guest1: two",
        "* guest1 is now known as alice",
        "alice: three",
        "alice: four",
    ]
    assert [(f["type"], f.get("text")) for f in net.frames(3)] == [
        ("msg", "one"),
        ("msg", "two"),
        ("renamed", None),
        ("msg", "three"),
        ("msg", "four"),
    ]
    assert net.lines(1) == ["* guest1 is now known as alice", "* 3 here: alice, guest2, bot"]


def test_a_batch_skips_each_sender_only_for_its_own_lines(net):
    net.plain(1)
    net.plain(2)
    net.plain(3)
    net.settle()
    net.send(1, b"from one\n")
    net.hub.post("fifo", "from the fifo", net.now)
    net.send(2, b"a\nb\n")
    assert net.lines(3) == ["guest1: from one", "fifo: from the fifo", "guest2: a", "guest2: b"]
    assert net.lines(1) == ["fifo: from the fifo", "guest2: a", "guest2: b"]
    assert net.lines(2) == ["guest1: from one", "fifo: from the fifo"]


def test_a_reader_that_a_batch_puts_too_far_behind_leaves_after_it(net):
    small = Net(max_queue=4096)
    small.plain(1)
    small.plain(2)
    small.plain(3)
    small.settle()
    small.hub.output(3).extend(b"x" * 8000)  # 3 has stopped reading
    small.send(1, b"".join(b"message %d\n" % i for i in range(30)))
    small.hub.take_dirty()
    assert [cid for cid, _ in small.hub.take_doomed()] == [3]
    assert len(small.lines(2)) == 30
    assert small.hub.members == 2


# ---- the ceiling on all output together -------------------------------------------------


def test_all_queues_together_stay_under_the_total_and_the_furthest_behind_go_first():
    hub = Hub(
        history_id="h",
        history_limit=10,
        max_line=1024,
        max_queue=1 << 20,  # each alone may hold plenty...
        log_chat=False,
        max_total=64 * 1024,  # ...but all together only 64 KiB
    )
    for cid in range(1, 11):
        hub.open(cid, "test")
        hub.receive(cid, b"/who\n", 0.0)
    # cid 1 talks; 2..10 never read, except 9 and 10 which drain now and then,
    # so 2..8 fall furthest behind.
    doomed: list[int] = []
    for i in range(200):
        hub.receive(1, b"x" * 600 + b"\n", float(i))
        hub.output(1).clear()
        if i % 10 == 0:
            for cid in (9, 10):
                hub.output(cid).clear()
        total = sum(len(p.out) for p in hub.peers.values())
        assert total <= 64 * 1024 + 2 * 1024  # the ceiling, give or take one frame
        doomed += [cid for cid, _ in hub.take_doomed()]
    assert doomed, "nobody was disconnected"
    assert set(doomed) <= set(range(2, 9))  # only those that never read
    assert 9 not in doomed and 10 not in doomed


def test_the_total_is_counted_exactly_only_now_and_then(monkeypatch):
    hub = Hub(
        history_id="h",
        history_limit=10,
        max_line=1024,
        max_queue=1 << 20,
        log_chat=False,
        max_total=1 << 20,
    )
    hub.open(1, "test")
    hub.open(2, "test")
    counts = []
    real = Hub._enforce_total

    def counting(self):
        counts.append(1)
        real(self)

    monkeypatch.setattr(Hub, "_enforce_total", counting)
    for i in range(1000):  # ~100 KB queued for 2, drained each time
        hub.receive(1, b"y" * 100 + b"\n", float(i))
        hub.output(2).clear()
    assert counts == []  # well under the ceiling: never counted


def test_a_queue_past_half_of_max_queue_asks_for_a_send_this_turn():
    net = Net(max_queue=8192)
    net.plain(1)
    net.plain(2)
    net.settle()
    net.send(1, b"x" * 1000 + b"\n")
    assert net.hub.full is False  # the I/O layer may gather more input first
    net.send(1, b"".join(b"y" * 1000 + b"\n" for _ in range(4)))
    assert net.hub.full is True  # 2's queue holds over 4096 bytes: send now
    net.hub.take_dirty()
    assert net.hub.full is False
