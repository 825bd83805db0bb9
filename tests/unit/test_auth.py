"""Token authentication without sockets: secret files, token lists, loopback,
the Gate (constant-time check, per-address back-off), and the server
connection's AWAIT_AUTH / JUDGING states."""

from __future__ import annotations

import os
import re
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import picchat.auth
from picchat.auth import (
    BACKOFF_BASE,
    FORGET_AFTER,
    REMEMBERED,
    TOKEN_MIN,
    Gate,
    SecretError,
    is_loopback,
    load_tokens,
    parse_tokens,
    read_secret,
)
from picchat.events import Auth, Closed, Fatal, Hello, Invalid, Refuse, Say
from picchat.protocol import AUTH_FIRST, ServerConnection, State

TOKEN = b"0123456789abcdef0123456789abcdef"
# Why a connection that has not sent its token may be refused: anything but
# its token, or a TLS handshake on the plain port.
REFUSALS = ("auth_required", "plain_port")
OTHER = b"fedcba9876543210fedcba9876543210"


def secret_file(tmp_path, content: bytes, mode: int = 0o600, name: str = "tokens"):
    path = tmp_path / name
    path.write_bytes(content)
    path.chmod(mode)
    return str(path)


# ---- read_secret -------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700, 0o200 | 0o400])
def test_read_secret_reads_a_file_only_its_owner_may_use(tmp_path, mode):
    path = secret_file(tmp_path, b"secret\n", mode)
    assert read_secret(path) == b"secret\n"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o610, 0o601, 0o644, 0o666, 0o777])
def test_read_secret_refuses_any_group_or_other_permission(tmp_path, mode):
    path = secret_file(tmp_path, b"secret\n", mode)
    with pytest.raises(SecretError) as info:
        read_secret(path, "token file")
    message = str(info.value)
    assert path in message
    assert f"{mode:04o}" in message
    assert f"chmod 600 {path}" in message


def test_read_secret_names_what_the_file_is_for(tmp_path):
    path = secret_file(tmp_path, b"k", 0o644)
    with pytest.raises(SecretError, match=r"^TLS key file "):
        read_secret(path, "TLS key file")


def test_read_secret_missing_file(tmp_path):
    path = str(tmp_path / "nope")
    with pytest.raises(SecretError, match="does not exist"):
        read_secret(path)


def test_read_secret_refuses_a_directory(tmp_path):
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    with pytest.raises(SecretError, match="is a directory"):
        read_secret(str(d))


def test_read_secret_refuses_a_device():
    with pytest.raises(SecretError, match="not a regular file"):
        read_secret("/dev/null")


def test_read_secret_refuses_a_fifo_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    outcome: list[object] = []

    def attempt() -> None:
        try:
            outcome.append(read_secret(str(fifo)))
        except SecretError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():  # blocked in open(): release it before failing
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(5)
        pytest.fail("read_secret waited for a writer on a FIFO")
    assert len(outcome) == 1
    assert isinstance(outcome[0], SecretError)
    assert "not a regular file" in str(outcome[0])


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_read_secret_leaves_no_file_open(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    (tmp_path / "dir").mkdir()
    paths = [
        secret_file(tmp_path, b"ok", 0o600, "good"),
        secret_file(tmp_path, b"no", 0o644, "open"),
        str(fifo),
        str(tmp_path / "dir"),
        "/dev/null",
    ]
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        for path in paths:
            try:
                read_secret(path)
            except SecretError:
                pass
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may read any file")
def test_read_secret_unreadable_file(tmp_path):
    path = secret_file(tmp_path, b"secret", 0o000)
    with pytest.raises(SecretError, match="not readable"):
        read_secret(path)


# ---- parse_tokens and load_tokens --------------------------------------------------


def test_parse_tokens_one_per_line_with_comments_and_blank_lines():
    text = b"# tokens for picchat\n\n" + TOKEN + b"\n  # an indented comment\n  " + OTHER + b"  \n"
    assert parse_tokens(text, "f") == [TOKEN, OTHER]


def test_parse_tokens_crlf_and_no_final_newline():
    assert parse_tokens(TOKEN + b"\r\n" + OTHER, "f") == [TOKEN, OTHER]


def test_parse_tokens_nothing():
    assert parse_tokens(b"", "f") == []
    assert parse_tokens(b"# only a comment\n\n", "f") == []


def test_parse_tokens_minimum_length():
    assert TOKEN_MIN == 16
    assert parse_tokens(b"a" * TOKEN_MIN, "f") == [b"a" * TOKEN_MIN]
    with pytest.raises(SecretError, match="at least 16"):
        parse_tokens(b"a" * (TOKEN_MIN - 1), "f")


@pytest.mark.parametrize(
    "bad",
    [
        b"0123456789 abcdef0123",  # a space inside
        b"0123456789\tabcdef0123",  # a tab inside
        "0123456789abcdéf0123".encode(),  # not ASCII
        b"0123456789abcdef\x00123",  # a control character
        b"0123456789abcdef\x7f123",  # DEL
        b"0123456789abcdef\x1b[31m",  # an escape sequence
    ],
)
def test_parse_tokens_refuses_anything_but_printable_ascii(bad):
    with pytest.raises(SecretError) as info:
        parse_tokens(TOKEN + b"\n" + bad + b"\n", "/etc/picchat/tokens")
    assert str(info.value).startswith("/etc/picchat/tokens: ")
    assert "printable ASCII" in str(info.value)


def test_parse_tokens_error_does_not_show_the_token():
    with pytest.raises(SecretError) as info:
        parse_tokens(b"short-secret", "f")
    assert "short-secret" not in str(info.value)


def test_load_tokens_file_and_environment(tmp_path):
    path = secret_file(tmp_path, b"# mine\n" + TOKEN + b"\n")
    assert load_tokens(path, OTHER.decode()) == [TOKEN, OTHER]
    assert load_tokens(path, None) == [TOKEN]
    assert load_tokens(path, "") == [TOKEN]


def test_load_tokens_environment_only_and_nothing():
    assert load_tokens("", " " + OTHER.decode() + "\n") == [OTHER]
    assert load_tokens("", None) == []


def test_load_tokens_refuses_a_file_without_tokens(tmp_path):
    path = secret_file(tmp_path, b"# nothing yet\n")
    with pytest.raises(SecretError, match="holds no token"):
        load_tokens(path, OTHER.decode())


def test_load_tokens_refuses_a_readable_file(tmp_path):
    path = secret_file(tmp_path, TOKEN + b"\n", 0o644)
    with pytest.raises(SecretError, match="chmod 600"):
        load_tokens(path, None)


def test_load_tokens_bad_environment_token_names_the_variable():
    with pytest.raises(SecretError, match=r"^PICCHAT_TOKEN: "):
        load_tokens("", "too short")
    with pytest.raises(SecretError, match=r"^PICCHAT_TOKEN: "):
        load_tokens("", "0123456789abcdefé")  # not ASCII


# ---- is_loopback ---------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.0.0.2",
        "127.255.255.254",
        "::1",
        "::ffff:127.0.0.1",
        "::ffff:127.1.2.3",
        "::1%lo",
    ],
)
def test_loopback(host):
    assert is_loopback(host)


@pytest.mark.parametrize(
    "host",
    [
        "128.0.0.1",
        "126.255.255.255",
        "10.0.0.1",
        "192.168.1.2",
        "0.0.0.0",
        "::",
        "::2",
        "::ffff:10.0.0.1",
        "::ffff:128.0.0.1",
        "2001:db8::1",
        "fe80::1%eth0",
        "localhost",  # a name is not an address: no lookups here
        "[::1]",
        "",
        "not an address",
    ],
)
def test_not_loopback(host):
    assert not is_loopback(host)


# ---- Gate: the check -------------------------------------------------------------


def test_check_accepts_every_valid_token_and_nothing_else():
    gate = Gate([TOKEN, OTHER])
    assert gate.check(TOKEN)
    assert gate.check(OTHER)
    for wrong in (b"", TOKEN[:-1], TOKEN + b"x", TOKEN.upper(), b"x" + TOKEN[1:], TOKEN + OTHER):
        assert not gate.check(wrong), wrong


def test_check_without_tokens_accepts_nothing():
    gate = Gate(())
    assert not gate.check(b"")
    assert not gate.check(TOKEN)


def test_check_compares_every_token_with_compare_digest(monkeypatch):
    calls = []
    real = picchat.auth.compare_digest

    def counting(a, b):
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(picchat.auth, "compare_digest", counting)
    tokens = [TOKEN, OTHER, b"x" * 20]
    gate = Gate(tokens)
    assert gate.check(TOKEN)  # the first one matches: the others are compared all the same
    assert calls == tokens
    calls.clear()
    assert not gate.check(b"nope" * 5)
    assert calls == tokens


def test_gate_keeps_a_copy_of_the_tokens():
    tokens = [TOKEN]
    gate = Gate(iter(tokens))
    tokens.append(OTHER)
    assert gate.check(TOKEN)
    assert not gate.check(OTHER)


# ---- Gate: the back-off ------------------------------------------------------------


def test_backoff_doubles_up_to_the_maximum():
    assert BACKOFF_BASE == 1.0
    gate = Gate([TOKEN], backoff_max=30.0)
    delays = [gate.failed("192.0.2.1", 100.0) for _ in range(8)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_backoff_maximum_that_is_not_a_power_of_two():
    gate = Gate([TOKEN], backoff_max=5.0)
    assert [gate.failed("a", 0.0) for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_backoff_survives_very_many_failures():
    gate = Gate([TOKEN], backoff_max=float("inf"))
    delays = [gate.failed("a", 0.0) for _ in range(2000)]  # no OverflowError
    assert delays[:3] == [1.0, 2.0, 4.0]
    assert max(delays) == delays[-1] < float("inf")


def test_wait_until_the_backoff_ends():
    gate = Gate([TOKEN])
    assert gate.wait("a", 100.0) == 0.0  # never failed
    assert gate.failed("a", 100.0) == 1.0
    assert gate.wait("a", 100.0) == 1.0
    assert gate.wait("a", 100.25) == 0.75
    assert gate.wait("a", 101.0) == 0.0
    assert gate.wait("a", 150.0) == 0.0
    assert gate.failed("a", 150.0) == 2.0  # remembered after its back-off ended
    assert gate.wait("a", 151.0) == 1.0


def test_backoff_is_per_address():
    gate = Gate([TOKEN])
    gate.failed("a", 0.0)
    gate.failed("a", 0.0)
    assert gate.wait("b", 0.0) == 0.0
    assert gate.failed("b", 0.0) == 1.0
    assert gate.wait("a", 0.0) == 2.0
    assert gate.remembered == 2


def test_success_forgets_the_failures():
    gate = Gate([TOKEN])
    gate.failed("a", 0.0)
    gate.failed("a", 0.0)
    gate.failed("b", 0.0)
    gate.succeeded("a")
    assert gate.wait("a", 0.0) == 0.0
    assert gate.remembered == 1
    assert gate.failed("a", 0.0) == 1.0
    gate.succeeded("never-seen")  # no error
    assert gate.remembered == 2


def test_an_address_starts_afresh_after_forget_after():
    gate = Gate([TOKEN], backoff_max=30.0)
    for _ in range(4):
        gate.failed("a", 0.0)  # the fourth: judged again no sooner than 8.0
    end = 8.0
    assert gate.wait("a", end + FORGET_AFTER) == 0.0  # not yet forgotten
    assert gate.remembered == 1
    assert gate.failed("a", end + FORGET_AFTER) == 16.0  # still counting
    end2 = end + FORGET_AFTER + 16.0
    assert gate.wait("a", end2 + FORGET_AFTER + 0.001) == 0.0
    assert gate.remembered == 0  # forgotten
    assert gate.failed("a", end2 + FORGET_AFTER + 0.001) == 1.0


def test_the_table_is_bounded_oldest_forgotten_first():
    gate = Gate([TOKEN])
    for i in range(REMEMBERED + 10):
        gate.failed(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert gate.remembered == REMEMBERED
    for i in range(10):  # the ten oldest are gone
        assert gate.wait(f"10.0.{i // 256}.{i % 256}", 0.5) == 0.0
    newest = REMEMBERED + 9
    assert gate.wait(f"10.0.{newest // 256}.{newest % 256}", 0.5) == 0.5
    assert gate.wait("10.0.0.10", 0.5) == 0.5  # the oldest kept


def test_a_new_failure_makes_an_address_the_newest(monkeypatch):
    monkeypatch.setattr(picchat.auth, "REMEMBERED", 3)
    gate = Gate([TOKEN])
    gate.failed("a", 0.0)
    gate.failed("b", 0.0)
    gate.failed("c", 0.0)
    gate.failed("a", 0.0)  # a again: now b is the oldest
    gate.failed("d", 0.0)
    assert gate.remembered == 3
    assert gate.wait("b", 0.0) == 0.0
    assert gate.wait("a", 0.0) == 2.0
    assert gate.wait("c", 0.0) == 1.0
    assert gate.wait("d", 0.0) == 1.0


# ---- the server connection's side ----------------------------------------------------


def test_a_connection_that_needs_a_token_starts_waiting_for_it():
    conn = ServerConnection(64, auth=True)
    assert conn.state is State.AWAIT_AUTH
    assert conn.authenticating
    assert ServerConnection(64).state is State.AWAIT_FIRST
    assert not ServerConnection(64).authenticating


@pytest.mark.parametrize(
    ("line", "token"),
    [
        (b"/auth " + TOKEN + b"\n", TOKEN),
        (b"/auth " + TOKEN + b"\r\n", TOKEN),
        (b"  /auth\t" + TOKEN + b" \t\n", TOKEN),
        (b"/AUTH " + TOKEN + b"\n", TOKEN),
        (b"/auth\n", b""),
        (b"/auth   \n", b""),
        (b"/auth \xff\xfe-not-utf8\n", b"\xff\xfe-not-utf8"),
    ],
)
def test_auth_line_gives_the_token_and_judging(line, token):
    conn = ServerConnection(256, auth=True)
    requests = conn.receive_data(line)
    assert requests == [Auth(token)]
    assert requests[0].token == token
    assert conn.state is State.JUDGING
    assert conn.authenticating


def test_auth_request_never_shows_its_token():
    assert "secret" not in repr(Auth(b"secret-token-1234"))
    assert "secret" not in str(Auth(b"secret-token-1234"))


@pytest.mark.parametrize(
    "line",
    [b"hello\n", b"/authx " + TOKEN + b"\n", b"/auth a b\n", b"/nick bob\n", b"/who\n", b"{}\n"],
)
def test_other_lines_before_the_token_are_refused(line):
    conn = ServerConnection(256, auth=True)
    assert conn.receive_data(line) == [Invalid("auth_required", AUTH_FIRST)]
    assert conn.state is State.AWAIT_AUTH
    assert conn.receive_data(b"/auth " + TOKEN + b"\n") == [Auth(TOKEN)]


def test_blank_lines_before_the_token_are_ignored():
    conn = ServerConnection(256, auth=True)
    assert conn.receive_data(b"\n \r\n\t\n") == []
    while conn.backlog:
        assert conn.next_requests() == []
    assert conn.state is State.AWAIT_AUTH


@pytest.mark.parametrize(
    "hello", [b"PICCHAT/1 {}\n", b'PICCHAT/1 {"name":"bot"}\n', b"PICCHAT/x\n"]
)
def test_a_hello_before_the_token_ends_the_connection(hello):
    conn = ServerConnection(256, auth=True)
    assert conn.receive_data(hello + b"/auth " + TOKEN + b"\n") == [
        Fatal("auth_required", AUTH_FIRST)
    ]
    assert conn.state is State.CLOSED
    assert not conn.backlog
    assert conn.receive_data(b"/auth " + TOKEN + b"\n") == []
    assert conn.next_requests() == []


def test_a_too_long_line_before_the_token_is_refused_and_the_state_kept():
    conn = ServerConnection(16, auth=True)
    assert conn.receive_data(b"x" * 40 + b"\n") == [Invalid("auth_required", AUTH_FIRST)]
    assert conn.state is State.AWAIT_AUTH
    assert conn.receive_data(b"y" * 40) == [Invalid("auth_required", AUTH_FIRST)]
    assert conn.receive_data(b"yyy\n/auth abc\n") == [Auth(b"abc")]


def test_one_line_per_call_while_waiting_for_the_token():
    conn = ServerConnection(256, auth=True)
    data = b"one\ntwo\n/auth " + TOKEN + b"\n/nick bob\nhello\n"
    assert conn.receive_data(data, limit=100) == [Invalid("auth_required", AUTH_FIRST)]
    assert conn.backlog
    assert conn.next_requests(limit=100) == [Invalid("auth_required", AUTH_FIRST)]
    assert conn.backlog
    assert conn.next_requests() == [Auth(TOKEN)]
    assert conn.state is State.JUDGING
    # Lines already received wait for the verdict: nothing more is parsed.
    assert not conn.backlog
    assert conn.next_requests() == []
    assert conn.receive_data(b"more\n") == []
    assert conn.next_requests() == []
    assert conn.state is State.JUDGING


def test_after_the_verdict_the_pipelined_lines_follow_in_order():
    conn = ServerConnection(256, auth=True)
    hello = b'PICCHAT/1 {"name":"bot"}\n'
    msg = b'{"type":"msg","text":"hi","id":"1"}\n'
    assert conn.receive_data(b"/auth " + TOKEN + b"\n" + hello) == [Auth(TOKEN)]
    assert conn.receive_data(msg) == []
    conn.authenticated()
    assert conn.state is State.AWAIT_FIRST
    assert not conn.authenticating
    assert conn.backlog
    requests = conn.next_requests()
    assert requests == [Hello(1, "bot", True, "", None, None), Say("hi", "1")]
    assert conn.state is State.JSON


def test_pipelined_plain_chat_after_the_token():
    conn = ServerConnection(256, auth=True)
    assert conn.receive_data(b"/auth " + TOKEN + b"\nhello all\n/who\n") == [Auth(TOKEN)]
    conn.authenticated()
    requests = conn.next_requests(limit=1)
    assert requests == [Say("hello all")]
    assert conn.backlog
    assert len(conn.next_requests()) == 1
    assert conn.state is State.PLAIN


def test_authenticated_only_ends_judging():
    conn = ServerConnection(256, auth=True)
    conn.authenticated()  # no token yet: no way around it
    assert conn.state is State.AWAIT_AUTH
    assert conn.receive_data(b"hello\n") == [Invalid("auth_required", AUTH_FIRST)]
    conn.receive_data(b"/auth " + TOKEN + b"\n")
    conn.authenticated()
    conn.authenticated()  # twice: no change
    assert conn.state is State.AWAIT_FIRST


def test_a_second_auth_line_after_the_verdict_is_ignored():
    conn = ServerConnection(256, auth=True)
    conn.receive_data(b"/auth " + TOKEN + b"\n")
    conn.authenticated()
    assert conn.receive_data(b"/auth " + OTHER + b"\nhi\n") == [Say("hi")]


def test_end_of_input_while_waiting_for_the_token():
    conn = ServerConnection(256, auth=True)
    assert conn.receive_data(b"") == [Closed()]
    assert conn.state is State.CLOSED
    conn = ServerConnection(256, auth=True)
    assert conn.receive_data(b"junk") == []
    assert conn.receive_data(b"") == [Invalid("auth_required", AUTH_FIRST), Closed()]


def test_end_of_input_while_judging_waits_for_the_verdict():
    conn = ServerConnection(256, auth=True)
    assert conn.receive_data(b"/auth " + TOKEN + b"\nbye\n") == [Auth(TOKEN)]
    assert conn.receive_data(b"") == []
    assert not conn.backlog
    conn.authenticated()
    assert conn.backlog
    assert conn.next_requests() == [Say("bye"), Closed()]
    assert conn.state is State.CLOSED


def test_an_unterminated_auth_line_at_the_end_waits_for_the_verdict_too():
    conn = ServerConnection(256, auth=True)
    assert conn.receive_data(b"/auth " + TOKEN) == []
    assert conn.receive_data(b"") == [Auth(TOKEN)]  # not followed by Closed yet
    assert conn.state is State.JUDGING
    assert not conn.backlog
    conn.authenticated()
    assert conn.backlog
    assert conn.next_requests() == [Closed()]
    assert conn.state is State.CLOSED


# ---- without auth: a token is ignored, never chat -----------------------------------


def test_without_auth_a_first_auth_line_is_ignored_and_the_state_kept():
    conn = ServerConnection(256)
    assert conn.receive_data(b"/auth " + TOKEN + b"\n") == []
    assert conn.state is State.AWAIT_FIRST
    assert conn.receive_data(b"PICCHAT/1 {}\n") == [Hello(1, None, True, "", None, None)]
    assert conn.state is State.JSON


def test_without_auth_an_auth_line_in_plain_chat_is_never_sent():
    conn = ServerConnection(256)
    assert conn.receive_data(b"hi\n/auth " + TOKEN + b"\n/AUTH x\nbye\n") == [
        Say("hi"),
        Say("bye"),
    ]
    assert conn.state is State.PLAIN


def test_without_auth_an_auth_line_in_json_is_ignored():
    conn = ServerConnection(256)
    conn.receive_data(b"PICCHAT/1 {}\n")
    assert conn.receive_data(b"/auth " + TOKEN + b"\n") == []
    assert conn.state is State.JSON


# ---- any bytes, any chunking ---------------------------------------------------------

fragments = st.one_of(
    st.binary(max_size=24),
    st.sampled_from(
        [
            b"\n",
            b"\r\n",
            b"/auth ",
            b"/AUTH\t",
            b"/auth",
            TOKEN,
            b"PICCHAT/1 {}",
            b'PICCHAT/1 {"name":"x"}\n',
            b'{"type":"msg","text":"hi"}\n',
            b"/nick bob\n",
            b"x" * 70,
        ]
    ),
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in [*points, len(data)]:
        if p > last:
            pieces.append(data[last:p])
            last = p
    return pieces


def run_auth_connection(chunks: list[bytes], verdict: str) -> list[object]:
    """Feed ``chunks`` then the end of input, draining the backlog as the hub
    does. The token is accepted as soon as it is asked for (``verdict="now"``),
    or only after all the input has arrived (``"later"``: the back-off held
    it), or never. Checks the invariants on the way; returns every request."""
    conn = ServerConnection(64, auth=True)
    seen: list[object] = []

    def take(requests):
        for request in requests:
            if isinstance(request, Refuse):  # telnet replies (bytes only): not the chat's
                assert re.fullmatch(rb"(?:\xff[\xfc\xfe][\x00-\xff])+", request.reply), request
                continue
            assert not seen or not isinstance(seen[-1], Closed), "after the end"
            if seen and isinstance(seen[-1], Fatal):  # (unterminated at the end of input)
                assert isinstance(request, Closed), request
            if not any(isinstance(r, Auth) for r in seen):
                # Before the token: nothing but refusals, the token, or the end.
                assert isinstance(request, (Auth, Invalid, Fatal, Closed)), request
                if isinstance(request, (Invalid, Fatal)):
                    assert request.code in REFUSALS, request
            else:
                assert not isinstance(request, Auth)
            seen.append(request)
        if conn.state is State.JUDGING:
            assert isinstance(seen[-1], Auth)  # nothing after the token until the verdict
            assert not conn.backlog
            if verdict == "now":
                conn.authenticated()

    def drain():
        while conn.backlog:
            take(conn.next_requests(limit=3, budget=50))

    for chunk in [*chunks, b""]:
        take(conn.receive_data(chunk, limit=3, budget=50))
        drain()
    if verdict == "later" and conn.state is State.JUDGING:
        conn.authenticated()
        drain()
    if conn.state is State.JUDGING:
        assert verdict == "never"
    else:
        assert conn.state is State.CLOSED
        assert isinstance(seen[-1], (Closed, Fatal))
    return seen


@settings(max_examples=300, deadline=None)
@given(st.lists(fragments, max_size=12), st.lists(st.integers(0, 1000), max_size=8))
def test_any_bytes_any_chunking_only_documented_requests(parts, cuts):
    data = b"".join(parts)
    whole = run_auth_connection([data] if data else [], "now")
    # However the bytes arrive, and whenever the verdict comes: the same requests.
    for verdict in ("now", "later"):
        assert run_auth_connection(chunked(data, cuts), verdict) == whole
        assert run_auth_connection([bytes([b]) for b in data], verdict) == whole
    # Without a verdict, everything up to the token and nothing after it.
    refused = run_auth_connection(chunked(data, cuts), "never")
    auths = [i for i, r in enumerate(whole) if isinstance(r, Auth)]
    assert refused == (whole[: auths[0] + 1] if auths else whole)


def test_an_overlong_line_right_after_the_token_is_reported_after_the_verdict():
    for chunks in (
        [b"/auth " + TOKEN + b"\n" + b"x" * 70 + b"\nhi\n"],
        [b"/auth " + TOKEN + b"\n" + b"x" * 70, b"\nhi\n"],
        [b"/auth " + TOKEN + b"\n", b"x" * 70, b"\nhi\n"],
    ):
        for verdict in ("now", "later"):
            requests = run_auth_connection(chunks, verdict)
            assert [type(r) for r in requests] == [Auth, Invalid, Say, Closed], (chunks, verdict)
            assert requests[1].code == "line_too_long"


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_without_the_token_line_nothing_is_ever_chat(data):
    data = data.replace(b"/", b"_")  # no /auth line can appear
    requests = run_auth_connection([data], "now")
    assert all(isinstance(r, (Invalid, Fatal, Closed)) for r in requests)
    assert requests[-1] == Closed()
