"""Sanitising: no control character or escape sequence reaches anyone's terminal."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from picchat.sanitize import TelnetRefusals, clean_bytes, clean_text, strip_telnet

FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")

IAC, SB, SE, DO, DONT, WILL, WONT, IP = 0xFF, 0xFA, 0xF0, 0xFD, 0xFE, 0xFB, 0xFC, 0xF4
LINEMODE, NEW_ENVIRON = 0x22, 0x27  # option codes that are printable characters


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\x1b[31mred\x1b[0m text", "red text"),
        (b"\x1b[1;32;40mbold green\x1b[m", "bold green"),
        (b"\x1b[2J\x1b[Hcleared", "cleared"),
        (b"up\x1b[5Adown\x1b[10;20H!", "updown!"),
        (b"\x1b[?25lhidden cursor\x1b[?25h", "hidden cursor"),
        (b"\x1b[6n query", " query"),  # a device status query: its answer would be typed back
    ],
)
def test_csi_colour_and_cursor_sequences_are_removed(raw, expected):
    assert clean_bytes(raw) == expected


def test_osc_title_terminated_by_bel_is_removed():
    assert clean_bytes(b"a\x1b]0;evil title\x07b") == "ab"


def test_osc_title_terminated_by_st_is_removed():
    assert clean_bytes(b"a\x1b]2;evil title\x1b\\b") == "ab"


def test_unterminated_osc_runs_to_the_end_of_the_line():
    assert clean_bytes(b"keep\x1b]0;title without end") == "keep"


def test_dcs_string_is_removed():
    assert clean_bytes(b"x\x1bP1$r0m\x1b\\y") == "xy"
    assert clean_bytes(b"x\x1bPq#0;2;0;0;0#0~~@@vv\x1b\\y") == "xy"


def test_8bit_c1_csi_is_removed():
    assert clean_text("\u009b31mred\u009b0m") == "red"
    assert clean_bytes("\u009b31mred".encode()) == "red"


def test_8bit_c1_osc_is_removed():
    assert clean_text("a\u009d0;title\u009cb") == "ab"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"end\x1b", "end"),
        (b"\x1bstart", "tart"),  # ESC s is a two-byte sequence (save cursor)
        (b"a\x1bcb", "ab"),  # ESC c: full reset
        (b"a\x1b(0b", "ab"),  # ESC ( 0: line drawing character set
        (b"\x1b\x1b\x1b", ""),
    ],
)
def test_bare_and_two_byte_esc_sequences_are_removed(raw, expected):
    assert clean_bytes(raw) == expected


def test_c0_controls_are_removed_but_tab_is_kept():
    raw = bytes(range(0x20)) + b"text"
    assert clean_bytes(raw) == "\ttext"
    assert clean_bytes(b"a\x00b\x07c\x08d\te\rf\x0bg\x0ch") == "abcd\tefgh"


def test_del_is_removed():
    assert clean_bytes(b"ab\x7fc") == "abc"


# The 8-bit introducers of CSI and of string sequences (DCS, SOS, OSC, PM, APC)
# swallow what follows them; the other C1 controls are removed one by one.
C1_INTRODUCERS = {0x90, 0x98, 0x9B, 0x9D, 0x9E, 0x9F}


def test_c1_controls_are_removed():
    text = "".join(chr(c) for c in range(0x80, 0xA0) if c not in C1_INTRODUCERS)
    assert clean_text("a" + text + "b") == "ab"
    assert clean_bytes(("a" + text + "b").encode()) == "ab"


@pytest.mark.parametrize("c", sorted(C1_INTRODUCERS))
def test_c1_string_and_csi_introducers_are_removed(c):
    assert clean_text(f"a{chr(c)}b") == "a"


def test_invalid_utf8_becomes_replacement_character():
    assert clean_bytes(b"a\xc3(b") == "a\ufffd(b"
    assert clean_bytes(b"\x80\xbf") == "\ufffd\ufffd"
    assert clean_bytes(b"caf\xe9") == "caf\ufffd"


def test_telnet_iac_ip_is_removed():
    assert clean_bytes(b"hello" + bytes([IAC, IP])) == "hello"


@pytest.mark.parametrize("verb", [DO, DONT, WILL, WONT])
def test_telnet_option_negotiation_is_removed_with_its_option(verb):
    assert clean_bytes(bytes([IAC, verb, LINEMODE]) + b"hi" + bytes([IAC, verb, 0x01])) == "hi"
    assert strip_telnet(b"a" + bytes([IAC, verb, NEW_ENVIRON]) + b"b") == b"ab"


def test_telnet_subnegotiation_is_removed():
    raw = b"a" + bytes([IAC, SB, 0x18, 0x00]) + b"xterm" + bytes([IAC, SE]) + b"b"
    assert clean_bytes(raw) == "ab"


def test_telnet_iac_iac_is_a_literal_ff():
    assert strip_telnet(bytes([0x61, IAC, IAC, 0x62])) == b"a\xffb"
    # a lone 0xFF byte is not UTF-8
    assert clean_bytes(bytes([0x61, IAC, IAC, 0x62])) == "a\ufffdb"


def test_telnet_iac_at_the_end_of_the_line_is_removed():
    assert strip_telnet(b"ab\xff") == b"ab"
    assert strip_telnet(b"ab\xff\xfd") == b"ab"


TM = 0x06  # TIMING-MARK


def test_telnet_ctrl_c_gets_its_timing_mark_refused():
    # telnet discards all output after Ctrl-C until the answer to DO TIMING-MARK
    assert TelnetRefusals().feed(bytes([IAC, IP, IAC, DO, TM])) == bytes([IAC, WONT, TM])


def test_telnet_asked_options_are_refused_and_refusals_need_no_answer():
    r = TelnetRefusals()
    assert r.feed(bytes([IAC, WILL, LINEMODE, IAC, DO, 0x01])) == bytes(
        [IAC, DONT, LINEMODE, IAC, WONT, 0x01]
    )
    assert r.feed(bytes([IAC, WONT, 0x01, IAC, DONT, 0x01])) == b""
    assert r.feed(b"plain text\n") == b""


def test_telnet_refusals_skip_literal_ff_and_subnegotiations():
    r = TelnetRefusals()
    assert r.feed(bytes([IAC, IAC, DO, TM])) == b""  # IAC IAC is a 0xFF byte of text
    sub = bytes([IAC, SB, 0x18, IAC, IAC, DO, TM, IAC, SE])
    assert r.feed(sub + bytes([IAC, DO, TM])) == bytes([IAC, WONT, TM])


def test_telnet_refusals_follow_a_command_cut_between_chunks():
    r = TelnetRefusals()
    assert r.feed(bytes([0x61, IAC])) == b""
    assert r.feed(bytes([DO])) == b""
    assert r.feed(bytes([TM, 0x62])) == bytes([IAC, WONT, TM])


def test_bytes_without_iac_are_returned_as_they_are():
    data = b"no telnet here"
    assert strip_telnet(data) is data


@pytest.mark.parametrize(
    "text", ["café", "日本語のテキスト", "party 🎉 time", "tab\tinside", "a|b~c"]
)
def test_multibyte_and_printable_text_is_untouched(text):
    assert clean_bytes(text.encode()) == text
    assert clean_text(text) == text


# ---- properties ---------------------------------------------------------------

nasty_bytes = st.one_of(
    st.binary(max_size=200),
    st.lists(
        st.sampled_from(
            [b"\x1b", b"[", b"]", b"P", b"\\", b"\x07", b"\xc2\x9b", b"\xc2\x9c", b"\xff",
             b"\xfa", b"\xf0", b"\xfd", b"0", b";", b"m", b"a", b"\xe6\x97\xa5", b"\n", b"\t"]
        ),
        max_size=80,
    ).map(b"".join),
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(nasty_bytes)
@example(b"\x1b\x00[31m")
@example(b"\xc2\x9b\xc2\x9b")
def test_clean_bytes_never_raises_and_leaves_no_controls(data):
    text = clean_bytes(data)
    assert isinstance(text, str)
    assert FORBIDDEN.search(text) is None
    assert "\x1b" not in text


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=100))
def test_clean_text_leaves_no_controls_and_is_idempotent(text):
    cleaned = clean_text(text)
    assert FORBIDDEN.search(cleaned) is None
    assert clean_text(cleaned) == cleaned
