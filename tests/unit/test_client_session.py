"""The interactive client's state without sockets: frames in, bytes and things to show out."""

from __future__ import annotations

import json

import pytest

from picchat.client_session import HELP, ClientSession, Closing, NameChanged, Show
from picchat.protocol import encode_hello, encode_request


def welcome(name="alice", history_id="h1", seq=0, session="tok1", **extra) -> dict:
    return {
        "type": "welcome",
        "name": name,
        "member": True,
        "history_id": history_id,
        "seq": seq,
        "max_line": 4096,
        "server": "picchat/test",
        "session": session,
    } | extra


def msg(seq, sender="bob", text="hi", time=1000.0, **extra) -> dict:
    return {"type": "msg", "seq": seq, "time": time, "from": sender, "text": text} | extra


def hello_obj(data: bytes) -> dict:
    assert data.startswith(b"PICCHAT/1 ") and data.endswith(b"\n")
    assert data.count(b"\n") == 1
    return json.loads(data[len(b"PICCHAT/1 ") :])


def requests(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines()]


def connected(name="alice", **kw) -> ClientSession:
    s = ClientSession(name, **kw)
    s.receive(welcome(name))
    assert s.connected
    return s


# ---- the hello -----------------------------------------------------------------------------


def test_first_hello_carries_the_name_and_no_session():
    s = ClientSession("alice", client="picchat-client/9")
    assert s.hello() == encode_hello("alice", member=True, client="picchat-client/9")
    assert hello_obj(s.hello()) == {"member": True, "name": "alice", "client": "picchat-client/9"}
    assert not s.connected


def test_hello_without_a_name():
    assert hello_obj(ClientSession().hello()) == {"member": True}


def test_after_a_welcome_the_hello_resumes_the_session_from_the_last_seq():
    s = ClientSession("alice")
    s.receive(welcome(seq=0, session="tok1"))
    s.receive(msg(1))
    s.receive(msg(2))
    s.disconnected()
    assert hello_obj(s.hello()) == {
        "member": True,
        "name": "alice",
        "session": "tok1",
        "resume": {"history_id": "h1", "seq": 2},
    }


def test_the_first_welcome_sets_seq_so_a_reconnect_does_not_replay_older_history():
    # Nothing was replayed on the first connection: what history held then is
    # not "missed". Resuming from 0 would replay all of it after any reconnect.
    s = ClientSession("alice")
    s.receive(welcome(seq=120))
    assert s.seq == 120
    assert hello_obj(s.hello())["resume"] == {"history_id": "h1", "seq": 120}
    assert s.receive(msg(120)) == (b"", [])  # not newer than what we started from
    assert s.receive(msg(121))[1] == [Show("bob: hi")]


def test_a_later_welcome_of_the_same_history_keeps_seq():
    s = ClientSession("alice")
    s.receive(welcome(seq=3))
    s.receive(msg(4))
    s.disconnected()
    s.receive(welcome(seq=9))  # messages 5..9 come as the replay that follows
    assert s.seq == 4
    assert s.receive(msg(5, replay=True))[1] == [Show("bob: hi", 1000.0)]


def test_a_welcome_without_a_session_keeps_the_old_token():
    s = ClientSession("alice")
    s.receive(welcome(session="tok1"))
    s.disconnected()
    s.receive(welcome(session=None))
    assert s.session == "tok1"


def test_the_welcome_gives_the_name_the_server_chose():
    s = ClientSession("alice")
    data, out = s.receive(welcome(name="guest3"))
    assert data == b""
    assert out == [Show("You are guest3", kind="notice"), NameChanged("guest3")]
    assert s.name == "guest3"
    assert hello_obj(s.hello())["name"] == "guest3"


# ---- typing while disconnected ---------------------------------------------------------------


def test_submit_while_disconnected_queues_and_shows_pending():
    s = ClientSession("alice")
    assert s.submit("hello") == (b"", [Show("(pending) hello", kind="status")])
    assert s.submit("  again  ") == (b"", [Show("(pending) again", kind="status")])
    assert list(s.unacked.items()) == [("1", "hello"), ("2", "again")]


def test_blank_lines_are_not_sent():
    s = connected()
    assert s.submit("") == (b"", [])
    assert s.submit("   \t ") == (b"", [])
    assert not s.unacked


def test_more_than_max_pending_is_refused_visibly():
    s = ClientSession("alice", max_pending=2)
    s.submit("one")
    s.submit("two")
    data, [note] = s.submit("three")
    assert data == b""
    assert note.kind == "error"
    assert note.text.startswith("not sent:")
    assert "max-pending" in note.text
    assert list(s.unacked.values()) == ["one", "two"]
    # Connected with two still unacknowledged: still refused.
    s.receive(welcome())
    assert s.submit("four")[1][0].kind == "error"
    s.receive({"type": "ack", "id": "1", "seq": 1})
    data, out = s.submit("five")
    assert out == []
    assert requests(data) == [{"type": "msg", "id": "3", "text": "five"}]


def test_on_welcome_all_unacked_are_resent_in_order_with_their_ids():
    s = ClientSession("alice")
    for text in ("one", "two", "three"):
        s.submit(text)
    data, out = s.receive(welcome())
    assert data == b"".join(
        encode_request({"type": "msg", "id": str(i), "text": t})
        for i, t in enumerate(("one", "two", "three"), 1)
    )
    assert out == [NameChanged("alice"), Show("sending 3 pending message(s)", kind="status")]
    # Sent but not acknowledged: still there, and sent again after another drop.
    assert list(s.unacked) == ["1", "2", "3"]
    s.receive({"type": "ack", "id": "2", "seq": 7})
    s.disconnected()
    data, _ = s.receive(welcome())
    assert requests(data) == [
        {"type": "msg", "id": "1", "text": "one"},
        {"type": "msg", "id": "3", "text": "three"},
    ]


def test_a_welcome_with_nothing_pending_sends_nothing():
    s = ClientSession("alice")
    assert s.receive(welcome()) == (b"", [NameChanged("alice")])


# ---- connected: messages and acks ----------------------------------------------------------


def test_submit_while_connected_sends_a_msg_with_a_fresh_id():
    s = connected()
    assert s.submit("hi") == (b'{"type":"msg","id":"1","text":"hi"}\n', [])
    assert s.submit("//etc/fstab is fine") == (
        b'{"type":"msg","id":"2","text":"/etc/fstab is fine"}\n',
        [],
    )
    assert list(s.unacked.items()) == [("1", "hi"), ("2", "/etc/fstab is fine")]


def test_ack_removes_the_message_and_ids_are_never_reused():
    s = connected()
    s.submit("a")
    s.submit("b")
    assert s.receive({"type": "ack", "id": "1", "seq": 5}) == (b"", [])
    assert list(s.unacked) == ["2"]
    s.receive({"type": "ack", "id": "2", "seq": 6})
    assert not s.unacked
    data, _ = s.submit("c")
    assert requests(data)[0]["id"] == "3"
    s.receive({"type": "ack", "id": "99", "seq": 7})  # unknown id: harmless
    assert list(s.unacked) == ["3"]


def test_acks_do_not_advance_seq():
    s = connected()
    s.receive(msg(3))
    s.submit("mine")
    s.receive({"type": "ack", "id": "1", "seq": 10})
    assert s.seq == 3
    # A message older than our own ack (a replay still going on) is still shown.
    assert s.receive(msg(4))[1] == [Show("bob: hi")]


def test_each_message_is_shown_once():
    s = connected()
    assert s.receive(msg(1, text="one")) == (b"", [Show("bob: one")])
    assert s.receive(msg(2, text="two")) == (b"", [Show("bob: two")])
    assert s.receive(msg(2, text="two")) == (b"", [])
    assert s.receive(msg(1, text="one")) == (b"", [])
    assert s.receive(msg(3, text="three")) == (b"", [Show("bob: three")])
    assert s.seq == 3


def test_a_msg_without_a_numeric_seq_is_skipped():
    s = connected()
    assert s.receive(msg(None)) == (b"", [])
    assert s.receive(msg("5")) == (b"", [])
    assert s.seq == 0


def test_replayed_messages_carry_their_time_and_live_ones_do_not():
    s = connected()
    assert s.receive(msg(1, time=1234.5, replay=True)) == (b"", [Show("bob: hi", 1234.5)])
    assert s.receive(msg(2, time=1300.0)) == (b"", [Show("bob: hi", None)])


def test_a_welcome_with_another_history_id_resets_seq():
    s = connected()
    s.receive(msg(50))
    s.disconnected()
    assert hello_obj(s.hello())["resume"] == {"history_id": "h1", "seq": 50}
    s.receive(welcome(history_id="h2", seq=3))
    assert s.seq == 0
    assert s.history_id == "h2"
    # The new history's numbers start again at 1: all of them are shown.
    assert s.receive(msg(1, replay=True))[1] == [Show("bob: hi", 1000.0)]
    assert s.receive(msg(2, replay=True))[1] == [Show("bob: hi", 1000.0)]
    s.disconnected()
    assert hello_obj(s.hello())["resume"] == {"history_id": "h2", "seq": 2}


# ---- commands ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "sent"),
    [
        ("/nick bob", {"type": "nick", "name": "bob"}),
        ("/NICK  bob ", {"type": "nick", "name": "bob"}),
        ("/who", {"type": "who"}),
        ("/names", {"type": "who"}),
        ("/quit", {"type": "quit"}),
        ("/exit", {"type": "quit"}),
    ],
)
def test_commands_map_to_frames(line, sent):
    s = connected()
    data, out = s.submit(line)
    assert requests(data) == [sent]
    assert out == []
    assert not s.unacked  # commands are not messages


def test_help_is_shown_locally_even_when_disconnected():
    for s in (ClientSession("alice"), connected()):
        assert s.submit("/help") == (b"", [Show(HELP, kind="notice")])


@pytest.mark.parametrize("line", ["/nick", "/nick two words"])
def test_nick_usage(line):
    s = connected()
    assert s.submit(line) == (b"", [Show("usage: /nick NAME (one word)", kind="error")])


def test_unknown_command():
    s = connected()
    data, [note] = s.submit("/frobnicate now")
    assert data == b""
    assert note == Show("unknown command /frobnicate; /help lists them", kind="error")


@pytest.mark.parametrize("line", ["/nick bob", "/who", "/frobnicate"])
def test_commands_needing_the_server_are_refused_while_disconnected(line):
    s = ClientSession("alice")
    cmd = line.split()[0]
    assert s.submit(line) == (b"", [Show(f"{cmd} needs the server; not connected", kind="error")])


def test_quit_while_disconnected_closes_at_once():
    s = ClientSession("alice")
    assert s.quit() == (b"", [Closing("quit")])


def test_quit_while_connected_waits_for_the_bye():
    s = connected()
    assert s.quit() == (b'{"type":"quit"}\n', [])
    assert s.receive({"type": "bye", "text": "Goodbye."}) == (b"", [Closing("quit")])


def test_a_bye_we_did_not_ask_for_is_shown():
    s = connected()
    assert s.receive({"type": "bye", "text": "Server is shutting down. Bye!"}) == (
        b"",
        [Show("Server is shutting down. Bye!", kind="status")],
    )


# ---- other frames --------------------------------------------------------------------------


def test_renamed_of_ourselves_changes_our_name():
    s = connected("alice")
    assert s.receive({"type": "renamed", "old": "alice", "new": "alicia"}) == (
        b"",
        [Show("You are now known as alicia", kind="notice"), NameChanged("alicia")],
    )
    assert s.name == "alicia"
    assert hello_obj(s.hello())["name"] == "alicia"


def test_renamed_of_someone_else_is_a_notice():
    s = connected("alice")
    assert s.receive({"type": "renamed", "old": "bob", "new": "rob"}) == (
        b"",
        [Show("bob is now known as rob", kind="notice")],
    )
    assert s.name == "alice"


def test_an_error_with_an_id_drops_that_message_from_unacked():
    s = connected()
    s.submit("one")
    s.submit("two")
    data, out = s.receive({"type": "error", "code": "empty", "text": "nope", "id": "1"})
    assert (data, out) == (b"", [Show("nope", kind="error")])
    assert list(s.unacked) == ["2"]
    # Without an id (or an unknown one) nothing is dropped.
    s.receive({"type": "error", "code": "bad_frame", "text": "x"})
    s.receive({"type": "error", "code": "bad_frame", "text": "x", "id": "77"})
    assert list(s.unacked) == ["2"]


@pytest.mark.parametrize("code", ["version", "bad_hello"])
def test_a_refused_hello_ends_the_session(code):
    s = ClientSession("alice")
    assert s.receive({"type": "error", "code": code, "text": "go away"}) == (
        b"",
        [Show("go away", kind="error"), Closing("go away", failed=True)],
    )


def test_a_name_error_after_the_hello_does_not_end_the_session():
    s = connected()
    out = s.receive({"type": "error", "code": "bad_hello", "text": "late"})[1]
    assert out == [Show("late", kind="error")]


@pytest.mark.parametrize("kind", ["gap", "presence", "notice"])
def test_gap_presence_and_notice_are_shown(kind):
    s = connected()
    frame = {"type": kind, "text": f"some {kind}", "reason": "overflow", "missed": 3}
    assert s.receive(frame) == (b"", [Show(f"some {kind}", kind="notice")])


def test_names_are_listed_with_the_rest_counted():
    s = connected()
    out = s.receive({"type": "names", "names": ["alice", "bob"], "count": 2})[1]
    assert out == [Show("2 here: alice, bob", kind="notice")]
    out = s.receive({"type": "names", "names": ["alice", "bob"], "count": 5})[1]
    assert out == [Show("5 here: alice, bob and 3 more", kind="notice")]


@pytest.mark.parametrize(
    "frame", [{"type": "future-thing", "x": 1}, {"no": "type"}, {"type": None}, {"type": 3}]
)
def test_unknown_frame_types_are_ignored(frame):
    s = connected()
    s.submit("pending")
    assert s.receive(frame) == (b"", [])
    assert s.connected
    assert list(s.unacked) == ["1"]


def test_disconnected_then_typing_is_pending_again():
    s = connected()
    s.disconnected()
    assert not s.connected
    assert s.submit("later") == (b"", [Show("(pending) later", kind="status")])
