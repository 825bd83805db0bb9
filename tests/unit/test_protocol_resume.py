"""The resume extension of the wire protocol: session and resume in the hello,
replayed messages, gaps, and the session token in the welcome."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from picchat.events import Chat, Fatal, Gap, Hello, Message, Resume, Welcome
from picchat.protocol import (
    ClientConnection,
    ServerConnection,
    State,
    Wire,
    encode,
    encode_hello,
)

MAX_LINE = 1024


def parse_hello(obj) -> list:
    conn = ServerConnection(MAX_LINE)
    line = b"PICCHAT/1 " + json.dumps(obj).encode() + b"\n"
    requests = conn.receive_data(line)
    return requests, conn


# ---- the hello -----------------------------------------------------------------------------


def test_hello_with_session_and_resume():
    conn = ServerConnection(MAX_LINE)
    data = encode_hello("alice", client="c/1", session="tok", resume={"history_id": "h1", "seq": 5})
    assert conn.receive_data(data) == [Hello(1, "alice", True, "c/1", "tok", Resume("h1", 5))]
    assert conn.state is State.JSON


def test_hello_without_them_has_none():
    requests, _ = parse_hello({"name": "alice"})
    assert requests == [Hello(1, "alice", True, "", None, None)]
    requests, _ = parse_hello({"session": None, "resume": None})
    assert requests == [Hello(1, None, True, "", None, None)]


def test_resume_at_seq_zero_and_limits_of_64_characters():
    requests, _ = parse_hello({"session": "s" * 64, "resume": {"history_id": "h" * 64, "seq": 0}})
    assert requests == [Hello(1, None, True, "", "s" * 64, Resume("h" * 64, 0))]


def test_resume_ignores_fields_it_does_not_know():
    requests, _ = parse_hello({"resume": {"history_id": "h", "seq": 2, "future": [1]}})
    assert requests[0].resume == Resume("h", 2)


@pytest.mark.parametrize(
    ("field", "value", "complaint"),
    [
        ("resume", {"history_id": "h1", "seq": -1}, "resume.seq"),
        ("resume", {"history_id": "h1", "seq": "5"}, "resume.seq"),
        ("resume", {"history_id": "h1", "seq": 1.5}, "resume.seq"),
        ("resume", {"history_id": "h1", "seq": True}, "resume.seq"),
        ("resume", {"history_id": "h1", "seq": None}, "resume.seq"),
        ("resume", {"history_id": "h1"}, "resume.seq"),
        ("resume", {"seq": 1}, "resume.history_id"),
        ("resume", {"history_id": 7, "seq": 1}, "resume.history_id"),
        ("resume", {"history_id": "h" * 65, "seq": 1}, "resume.history_id"),
        ("resume", ["h1", 1], "resume must be an object"),
        ("resume", "h1:1", "resume must be an object"),
        ("resume", 5, "resume must be an object"),
        ("session", 12345, "session must be a string"),
        ("session", ["tok"], "session must be a string"),
        ("session", "t" * 65, "session must be a string"),
    ],
)
def test_a_bad_session_or_resume_is_a_fatal_bad_hello(field, value, complaint):
    requests, conn = parse_hello({"name": "alice", field: value})
    [fatal] = requests
    assert isinstance(fatal, Fatal)
    assert fatal.code == "bad_hello"
    assert fatal.text.startswith("bad hello: ")
    assert complaint in fatal.text
    assert conn.state is State.CLOSED
    assert conn.receive_data(b'{"type":"msg","text":"x"}\n') == []


@settings(max_examples=200, deadline=None)
@given(
    session=st.text(max_size=64),
    history_id=st.text(max_size=64),
    seq=st.integers(0, 2**63),
)
def test_session_and_resume_round_trip_through_the_hello(session, history_id, seq):
    conn = ServerConnection(MAX_LINE * 16)
    data = encode_hello(None, session=session, resume={"history_id": history_id, "seq": seq})
    [hello] = conn.receive_data(data)
    assert hello == Hello(1, None, True, "", session, Resume(history_id, seq))


# ---- frames from the server ------------------------------------------------------------------

MSG = Message(7, 1764072000.25, "bob", "hi", origin="secret-token")


def test_a_replayed_chat_is_marked_in_json_and_the_origin_is_never_sent():
    assert encode(Chat(MSG, replay=True), Wire.JSON) == (
        b'{"type":"msg","seq":7,"time":1764072000.25,"from":"bob","text":"hi","replay":true}\n'
    )
    assert encode(Chat(MSG), Wire.JSON) == (
        b'{"type":"msg","seq":7,"time":1764072000.25,"from":"bob","text":"hi"}\n'
    )


def test_a_replayed_chat_in_plain_is_the_usual_line():
    assert encode(Chat(MSG, replay=True), Wire.PLAIN) == b"bob: hi\n"
    assert encode(Chat(MSG), Wire.PLAIN) == b"bob: hi\n"


def test_gap_in_json_and_plain():
    gap = Gap("overflow", 3, "You missed 3 messages.")
    assert encode(gap, Wire.JSON) == (
        b'{"type":"gap","reason":"overflow","missed":3,"text":"You missed 3 messages."}\n'
    )
    assert encode(gap, Wire.PLAIN) == b"* You missed 3 messages.\n"
    restarted = Gap("new_history", None, "History restarted.")
    assert encode(restarted, Wire.JSON) == (
        b'{"type":"gap","reason":"new_history","missed":null,"text":"History restarted."}\n'
    )
    assert encode(restarted, Wire.PLAIN) == b"* History restarted.\n"


def welcome(session: str | None) -> Welcome:
    return Welcome("alice", "h1", 4, 4096, "picchat/0", member=True, session=session)


def test_welcome_with_a_session_carries_it_behind_the_version_tag():
    assert encode(welcome("tok"), Wire.JSON) == (
        b'PICCHAT/1 {"type":"welcome","name":"alice","member":true,"history_id":"h1",'
        b'"seq":4,"max_line":4096,"server":"picchat/0","session":"tok"}\n'
    )


def test_welcome_without_a_session_has_no_session_field():
    data = encode(welcome(None), Wire.JSON)
    assert b"session" not in data
    assert json.loads(data[len(b"PICCHAT/1 ") :])["seq"] == 4


def test_welcome_in_plain_never_shows_the_token():
    assert encode(welcome("tok"), Wire.PLAIN) == (
        b"* Welcome to picchat! You are alice. Type /help for commands.\n"
    )


def test_the_client_side_reads_the_session_and_replayed_frames():
    client = ClientConnection()
    data = (
        b"* Welcome to picchat! You are guest1. Type /help for commands.\n"
        + encode(welcome("tok"), Wire.JSON)
        + encode(Gap("overflow", 2, "missed 2"), Wire.JSON)
        + encode(Chat(MSG, replay=True), Wire.JSON)
    )
    welcome_frame, gap, msg = client.receive_data(data)
    assert client.welcome is welcome_frame
    assert welcome_frame["session"] == "tok"
    assert (gap["type"], gap["missed"]) == ("gap", 2)
    assert (msg["seq"], msg["replay"]) == (7, True)
    assert "origin" not in msg
