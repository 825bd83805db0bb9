"""The wire protocol without sockets: bytes in, requests out; frames in, bytes out."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from picchat.events import (
    Ack,
    Bye,
    Chat,
    Closed,
    Error,
    Fatal,
    Hello,
    Help,
    Invalid,
    Message,
    Names,
    Nick,
    Notice,
    Presence,
    Quit,
    Refuse,
    Renamed,
    Say,
    Welcome,
    Who,
)
from picchat.protocol import (
    ClientConnection,
    ProtocolError,
    ServerConnection,
    State,
    Wire,
    encode,
    encode_hello,
    encode_hello_reply,
    encode_request,
)

MAX_LINE = 256


def plain_conn() -> ServerConnection:
    conn = ServerConnection(MAX_LINE)
    assert conn.receive_data(b"first\n") == [Say("first")]
    return conn


def json_conn(name: str | None = "x") -> ServerConnection:
    conn = ServerConnection(MAX_LINE)
    [hello] = conn.receive_data(encode_hello(name))
    assert isinstance(hello, Hello)
    assert conn.state is State.JSON
    return conn


def frame(**obj) -> bytes:
    return encode_request(obj)


# ---- the first line decides the format ------------------------------------------


def test_new_connection_awaits_its_first_line_and_counts_as_plain():
    conn = ServerConnection(MAX_LINE)
    assert conn.state is State.AWAIT_FIRST
    assert conn.wire is Wire.PLAIN
    assert conn.max_line == MAX_LINE


def test_first_plain_line_makes_a_plain_connection_and_is_a_message():
    conn = ServerConnection(MAX_LINE)
    assert conn.receive_data(b"hello there\r\n") == [Say("hello there")]
    assert conn.state is State.PLAIN
    assert conn.wire is Wire.PLAIN


def test_hello_line_makes_a_json_connection():
    conn = ServerConnection(MAX_LINE)
    assert conn.receive_data(b'PICCHAT/1 {"name":"x"}\n') == [Hello(1, "x", True, "")]
    assert conn.state is State.JSON
    assert conn.wire is Wire.JSON


def test_hello_fields():
    conn = ServerConnection(MAX_LINE)
    line = b'PICCHAT/1 {"name":"cron","member":false,"client":"send/1\\u001b[31m"}\n'
    assert conn.receive_data(line) == [Hello(1, "cron", False, "send/1")]


def test_hello_without_json_object_is_accepted():
    conn = ServerConnection(MAX_LINE)
    assert conn.receive_data(b"PICCHAT/1\n") == [Hello(1, None, True, "")]


def test_other_version_is_fatal():
    conn = ServerConnection(MAX_LINE)
    [req] = conn.receive_data(b"PICCHAT/2 {}\n")
    assert isinstance(req, Fatal)
    assert req.code == "version"
    assert "PICCHAT/2" in req.text
    assert conn.state is State.CLOSED
    assert conn.receive_data(b"anything\n") == []


@pytest.mark.parametrize(
    "line",
    [
        b"PICCHAT/1 {not json\n",
        b"PICCHAT/1 [1, 2]\n",
        b'PICCHAT/1 {"name": 5}\n',
        b'PICCHAT/1 {"member": "yes"}\n',
        b"PICCHAT/one {}\n",
        b"PICCHAT/1 \xff\xfe\n",
    ],
)
def test_bad_hello_is_fatal(line):
    conn = ServerConnection(MAX_LINE)
    [req] = conn.receive_data(line)
    assert isinstance(req, Fatal)
    assert req.code == "bad_hello"
    assert conn.state is State.CLOSED


def test_deeply_nested_json_hello_is_a_bad_hello_not_a_crash():
    conn = ServerConnection(200_000)
    [req] = conn.receive_data(b"PICCHAT/1 " + b"[" * 50_000 + b"\n")
    assert isinstance(req, Fatal)
    assert req.code == "bad_hello"


def test_requests_after_a_fatal_hello_in_the_same_chunk_are_ignored():
    conn = ServerConnection(MAX_LINE)
    reqs = conn.receive_data(b"PICCHAT/9 {}\nhello\n")
    assert [type(r) for r in reqs] == [Fatal]


# ---- plain requests ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"/nick alice", [Nick("alice")]),
        (b"/NICK   alice  ", [Nick("alice")]),
        (b"/who", [Who()]),
        (b"/names", [Who()]),
        (b"/help", [Help()]),
        (b"/quit", [Quit()]),
        (b"/exit", [Quit()]),
        (b"//x", [Say("/x")]),
        (b"//", [Say("/")]),
        (b"", []),
        (b"   \t ", []),
        (b"\x1b[31m\x1b[0m", []),
        (b"  spaced out  ", [Say("spaced out")]),
        (b"PICCHAT/1 {}", [Say("PICCHAT/1 {}")]),  # only a first line can be a hello
    ],
)
def test_plain_commands(line, expected):
    conn = plain_conn()
    assert conn.receive_data(line + b"\n") == expected


@pytest.mark.parametrize("line", [b"/nick", b"/nick   ", b"/nick two words"])
def test_plain_nick_without_one_word_is_a_usage_error(line):
    [req] = plain_conn().receive_data(line + b"\n")
    assert isinstance(req, Invalid)
    assert req.code == "usage"


def test_plain_unknown_command():
    [req] = plain_conn().receive_data(b"/frobnicate now\n")
    assert isinstance(req, Invalid)
    assert req.code == "unknown_command"
    assert "/frobnicate" in req.text
    assert "/nick" in req.text


def test_plain_text_is_sanitised():
    assert plain_conn().receive_data(b"\x1b]0;pwned\x07hi \x1b[1mthere\xff\xf4\n") == [
        Say("hi there")
    ]


def test_plain_line_as_first_line_can_be_a_command():
    conn = ServerConnection(MAX_LINE)
    assert conn.receive_data(b"/who\n") == [Who()]
    assert conn.state is State.PLAIN


def test_empty_first_line_makes_a_plain_connection_and_says_nothing():
    conn = ServerConnection(MAX_LINE)
    assert conn.receive_data(b"\n") == []
    assert conn.state is State.PLAIN


# ---- JSON requests -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (frame(type="msg", text="hi", id="17"), Say("hi", "17")),
        (frame(type="msg", text="hi", id=17), Say("hi", "17")),
        (frame(type="msg", text="  hi \x1b[31m "), Say("hi")),
        (frame(type="nick", name="bob", id="18"), Nick("bob", "18")),
        (frame(type="who", id="19"), Who("19")),
        (frame(type="who"), Who()),
        (frame(type="quit"), Quit()),
    ],
)
def test_json_frames(data, expected):
    assert json_conn().receive_data(data) == [expected]


@pytest.mark.parametrize(
    ("data", "code", "id_"),
    [
        (b"not json\n", "bad_frame", None),
        (b"[1, 2]\n", "bad_frame", None),
        (b'"msg"\n', "bad_frame", None),
        (b"\xff\xfe\n", "bad_frame", None),
        (frame(type="dance", id="3"), "unknown_type", "3"),
        (frame(text="no type"), "unknown_type", None),
        (frame(type="msg", text=5, id="4"), "bad_frame", "4"),
        (frame(type="msg", id="5"), "bad_frame", "5"),
        (frame(type="msg", text="", id="6"), "empty", "6"),
        (frame(type="msg", text=" \x07 ", id="7"), "empty", "7"),
        (frame(type="nick", name=None, id="8"), "bad_frame", "8"),
        (frame(type="msg", text="hi", id=True), "bad_frame", None),
        (frame(type="msg", text="hi", id=["a"]), "bad_frame", None),
        (frame(type="msg", text="hi", id="x" * 65), "bad_frame", None),
    ],
)
def test_bad_json_frames_are_invalid_and_the_connection_lives(data, code, id_):
    conn = json_conn(None)
    [req] = conn.receive_data(data)
    assert isinstance(req, Invalid)
    assert (req.code, req.id) == (code, id_)
    assert conn.state is State.JSON
    assert conn.receive_data(frame(type="msg", text="still here")) == [Say("still here")]


def test_deeply_nested_json_frame_is_a_bad_frame_not_a_crash():
    conn = ServerConnection(200_000)
    conn.receive_data(encode_hello(None))
    for data in (b"[" * 50_000, b'{"a":' * 30_000):
        [req] = conn.receive_data(data + b"\n")
        assert isinstance(req, Invalid)
        assert req.code == "bad_frame"
    assert conn.receive_data(frame(type="who")) == [Who()]


# ---- framing errors and end of stream ------------------------------------------------


def test_too_long_line_is_invalid_and_the_connection_lives():
    conn = plain_conn()
    reqs = conn.receive_data(b"x" * (MAX_LINE + 1) + b"\nafter\n")
    assert len(reqs) == 2
    assert isinstance(reqs[0], Invalid)
    assert reqs[0].code == "line_too_long"
    assert str(MAX_LINE) in reqs[0].text
    assert reqs[1] == Say("after")
    assert conn.state is State.PLAIN


def test_too_long_first_line_makes_a_plain_connection():
    conn = ServerConnection(MAX_LINE)
    [req] = conn.receive_data(b"PICCHAT/1 " + b"x" * MAX_LINE + b"\n")
    assert isinstance(req, Invalid)
    assert req.code == "line_too_long"
    assert conn.state is State.PLAIN


def test_too_long_line_in_json_state():
    conn = json_conn()
    [req] = conn.receive_data(b"y" * (MAX_LINE * 3))
    assert isinstance(req, Invalid)
    assert req.code == "line_too_long"
    assert conn.receive_data(b"yyy\n" + frame(type="who")) == [Who()]


def test_eof_delivers_a_partial_last_line_then_closed():
    conn = plain_conn()
    assert conn.receive_data(b"last words") == []
    assert conn.receive_data(b"") == [Say("last words"), Closed()]
    assert conn.state is State.CLOSED
    assert conn.receive_data(b"more\n") == []
    assert conn.receive_data(b"") == []


def test_eof_without_partial_line():
    conn = plain_conn()
    assert conn.receive_data(b"") == [Closed()]


def test_eof_after_an_overlong_unterminated_line_reports_it():
    conn = plain_conn()
    assert conn.receive_data(b"z" * (MAX_LINE + 1)) == []
    reqs = conn.receive_data(b"")
    assert [type(r) for r in reqs] == [Invalid, Closed]
    assert reqs[0].code == "line_too_long"


def test_eof_with_only_a_hello_and_no_newline():
    conn = ServerConnection(MAX_LINE)
    assert conn.receive_data(b'PICCHAT/1 {"name":"n"}') == []
    assert conn.receive_data(b"") == [Hello(1, "n", True, ""), Closed()]


# ---- encoding --------------------------------------------------------------------------

MSG = Message(seq=7, time=1764072000.25, sender="bob", text="hi there")
WELCOME = Welcome(
    name="alice", history_id="h1", seq=120, max_line=4096, server="picchat/0.1", member=True
)


def decode_json(data: bytes) -> dict:
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1
    return json.loads(data)


def test_encode_chat():
    assert encode(Chat(MSG), Wire.PLAIN) == b"bob: hi there\n"
    assert decode_json(encode(Chat(MSG), Wire.JSON)) == {
        "type": "msg",
        "seq": 7,
        "time": 1764072000.25,
        "from": "bob",
        "text": "hi there",
    }


def test_encode_non_ascii_text_as_utf8():
    msg = Message(1, 0.0, "ünï", "日本 🎉")
    assert encode(Chat(msg), Wire.PLAIN) == "ünï: 日本 🎉\n".encode()
    assert decode_json(encode(Chat(msg), Wire.JSON))["text"] == "日本 🎉"


def test_encode_welcome():
    plain = encode(WELCOME, Wire.PLAIN)
    assert plain.startswith(b"* Welcome")
    assert b"alice" in plain
    assert plain.endswith(b"\n")
    data = encode(WELCOME, Wire.JSON)
    assert data.startswith(b"PICCHAT/1 ")
    assert decode_json(data[len(b"PICCHAT/1 ") :]) == {
        "type": "welcome",
        "name": "alice",
        "member": True,
        "history_id": "h1",
        "seq": 120,
        "max_line": 4096,
        "server": "picchat/0.1",
    }


def test_encode_notice():
    assert encode(Notice("be nice", "help"), Wire.PLAIN) == b"* be nice\n"
    assert decode_json(encode(Notice("be nice", "help"), Wire.JSON)) == {
        "type": "notice",
        "code": "help",
        "text": "be nice",
    }


@pytest.mark.parametrize(
    ("presence", "text"),
    [
        (Presence(("carol",), 1, (), 0), "carol joined"),
        (Presence((), 0, ("dave",), 1), "dave left"),
        (Presence(("bob", "carol"), 5, ("dave",), 1), "bob, carol and 3 others joined; dave left"),
        (Presence(("bob",), 2, ("x", "y"), 3), "bob and 1 other joined; x, y and 1 other left"),
    ],
)
def test_encode_presence(presence, text):
    assert encode(presence, Wire.PLAIN) == f"* {text}\n".encode()
    assert decode_json(encode(presence, Wire.JSON)) == {
        "type": "presence",
        "joined": list(presence.joined),
        "joined_count": presence.joined_count,
        "left": list(presence.left),
        "left_count": presence.left_count,
        "text": text,
    }


def test_encode_renamed():
    assert encode(Renamed("guest3", "alice"), Wire.PLAIN) == b"* guest3 is now known as alice\n"
    assert decode_json(encode(Renamed("guest3", "alice"), Wire.JSON)) == {
        "type": "renamed",
        "old": "guest3",
        "new": "alice",
    }


def test_encode_names():
    names = Names(("alice", "bob", "carol"), 3, "19")
    assert encode(names, Wire.PLAIN) == b"* 3 here: alice, bob, carol\n"
    assert decode_json(encode(names, Wire.JSON)) == {
        "type": "names",
        "names": ["alice", "bob", "carol"],
        "count": 3,
        "id": "19",
    }
    many = Names(("alice", "bob"), 250)
    assert encode(many, Wire.PLAIN) == b"* 250 here: alice, bob and 248 more\n"
    assert "id" not in decode_json(encode(many, Wire.JSON))


def test_encode_ack():
    assert encode(Ack("17", 122), Wire.PLAIN) == b""
    assert decode_json(encode(Ack("17", 122), Wire.JSON)) == {"type": "ack", "id": "17", "seq": 122}


def test_encode_error():
    err = Error("name_taken", "the name bob is taken", "18")
    assert encode(err, Wire.PLAIN) == b"! the name bob is taken\n"
    assert decode_json(encode(err, Wire.JSON)) == {
        "type": "error",
        "code": "name_taken",
        "text": "the name bob is taken",
        "id": "18",
    }
    assert "id" not in decode_json(encode(Error("usage", "no"), Wire.JSON))


def test_encode_bye():
    assert encode(Bye("Goodbye."), Wire.PLAIN) == b"* Goodbye.\n"
    assert decode_json(encode(Bye("Goodbye."), Wire.JSON)) == {"type": "bye", "text": "Goodbye."}


def test_encode_hello_reply_carries_the_version_tag():
    data = encode_hello_reply(Error("version", "nope"))
    assert data.startswith(b"PICCHAT/1 ")
    assert decode_json(data[len(b"PICCHAT/1 ") :]) == {
        "type": "error",
        "code": "version",
        "text": "nope",
    }


def test_encode_refuses_what_is_not_a_frame():
    with pytest.raises(TypeError):
        encode(Say("hi"), Wire.PLAIN)
    with pytest.raises(TypeError):
        encode(Say("hi"), Wire.JSON)


# ---- the client's side -------------------------------------------------------------------


def test_client_skips_plain_lines_before_the_welcome():
    client = ClientConnection()
    data = (
        encode(Welcome("guest1", "h1", 0, 4096, "picchat/0.1"), Wire.PLAIN)
        + b"guest2: chatter before the reply\n"
        + encode(WELCOME, Wire.JSON)
        + encode(Chat(MSG), Wire.JSON)
        + encode(Ack("1", 8), Wire.JSON)
    )
    frames = client.receive_data(data)
    assert [f["type"] for f in frames] == ["welcome", "msg", "ack"]
    assert client.welcome == frames[0]
    assert client.welcome["name"] == "alice"
    assert frames[1]["from"] == "bob"
    assert frames[2] == {"type": "ack", "id": "1", "seq": 8}


def test_client_byte_by_byte():
    client = ClientConnection()
    data = b"* hello people\r\n" + encode(WELCOME, Wire.JSON) + encode(Bye("bye"), Wire.JSON)
    frames = []
    for i in range(len(data)):
        frames.extend(client.receive_data(data[i : i + 1]))
    assert [f["type"] for f in frames] == ["welcome", "bye"]


@pytest.mark.parametrize("garbage", [b"not json\n", b"[1]\n", b"* plain line\n"])
def test_client_raises_protocol_error_for_garbage_after_the_welcome(garbage):
    client = ClientConnection()
    client.receive_data(encode(WELCOME, Wire.JSON))
    with pytest.raises(ProtocolError):
        client.receive_data(garbage)


def test_client_accepts_an_error_hello_reply():
    client = ClientConnection()
    [f] = client.receive_data(encode_hello_reply(Error("version", "too new")))
    assert f["type"] == "error"
    assert client.welcome is None


def test_client_accepts_an_error_from_a_server_of_another_version():
    client = ClientConnection()
    [f] = client.receive_data(b'PICCHAT/2 {"type":"error","code":"version","text":"old"}\n')
    assert f["code"] == "version"


def test_client_refuses_a_welcome_from_another_version():
    client = ClientConnection()
    with pytest.raises(ProtocolError):
        client.receive_data(b'PICCHAT/2 {"type":"welcome","name":"x"}\n')


@pytest.mark.parametrize("line", [b"PICCHAT/1 {bad\n", b"PICCHAT/1 [1]\n"])
def test_client_refuses_a_malformed_hello_reply(line):
    with pytest.raises(ProtocolError):
        ClientConnection().receive_data(line)


@pytest.mark.parametrize("line", [b"PICCHAT/x\n", b'PICCHAT/1: {"type":"welcome"}\n'])
def test_client_skips_lines_that_only_look_like_a_reply(line):
    # "PICCHAT/1: ..." is chat from a member named PICCHAT/1 (names have no
    # space, and chat lines have a colon): it must not pass for the welcome.
    client = ClientConnection()
    assert client.receive_data(line) == []
    assert client.welcome is None
    assert client.last_plain == line.decode().rstrip("\n")


def test_client_refuses_an_overlong_line():
    client = ClientConnection(max_line=16)
    with pytest.raises(ProtocolError):
        client.receive_data(b"x" * 40 + b"\n")


# ---- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        (("alice",), {}, Hello(1, "alice", True, "")),
        ((None,), {}, Hello(1, None, True, "")),
        (("cron",), {"member": False, "client": "picchat-send/0.1"}, Hello(1, "cron", False,
                                                                           "picchat-send/0.1")),
    ],
)  # fmt: skip
def test_encode_hello_round_trip(args, kwargs, expected):
    data = encode_hello(*args, **kwargs)
    assert data.startswith(b"PICCHAT/1 ")
    assert ServerConnection(MAX_LINE).receive_data(data) == [expected]


@settings(max_examples=200, deadline=None)
@given(
    name=st.one_of(st.none(), st.text(max_size=20)),
    member=st.booleans(),
    client=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30),
)
def test_encode_hello_round_trip_property(name, member, client):
    [hello] = ServerConnection(4096).receive_data(encode_hello(name, member=member, client=client))
    assert hello == Hello(1, name, member, client)


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=1, max_size=50), seq=st.integers(1, 10**9))
def test_server_frames_round_trip_through_the_client(text, seq):
    client = ClientConnection()
    msg = Message(seq, 1.5, "bob", text)
    frames = client.receive_data(encode(WELCOME, Wire.JSON) + encode(Chat(msg), Wire.JSON))
    assert frames[1] == {"type": "msg", "seq": seq, "time": 1.5, "from": "bob", "text": text}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=80), max_size=8))
def test_server_connection_never_raises(chunks):
    conn = ServerConnection(64)
    for chunk in chunks:
        for req in conn.receive_data(chunk):
            assert not isinstance(req, Closed)
    was_closed = conn.state is State.CLOSED  # after a fatal hello
    reqs = conn.receive_data(b"")
    assert conn.state is State.CLOSED
    if was_closed:
        assert reqs == []
    else:
        assert reqs[-1] == Closed()


def test_client_refuses_deeply_nested_json_with_a_protocol_error():
    client = ClientConnection()
    with pytest.raises(ProtocolError):
        client.receive_data(b"PICCHAT/1 " + b"[" * 50_000 + b"\n")
    client = ClientConnection()
    client.receive_data(encode(WELCOME, Wire.JSON))
    with pytest.raises(ProtocolError):
        client.receive_data(b"[" * 50_000 + b"\n")


# ---- telnet ------------------------------------------------------------------------------

CTRL_C = b"\xff\xf4\xff\xfd\x06"  # what telnet sends for Ctrl-C: IAC IP, IAC DO TIMING-MARK


def test_a_plain_connection_gets_telnet_options_refused():
    conn = ServerConnection(4096)
    assert conn.receive_data(b"hi\n" + CTRL_C)[-1] == Refuse(b"\xff\xfc\x06")


def test_telnet_options_are_refused_while_the_token_is_judged():
    conn = ServerConnection(4096, auth=True)
    requests = conn.receive_data(b"/auth tok\r\n" + CTRL_C)
    assert conn.state is State.JUDGING
    assert Refuse(b"\xff\xfc\x06") in requests
    assert conn.receive_data(CTRL_C) == [Refuse(b"\xff\xfc\x06")]


def test_a_structured_connection_never_gets_telnet_replies():
    conn = ServerConnection(4096)
    requests = conn.receive_data(b'PICCHAT/1 {"name": "a"}\n' + CTRL_C)
    assert not any(isinstance(r, Refuse) for r in requests)
    assert conn.receive_data(CTRL_C) == []
