"""The sans-IO line editor: keystroke bytes in, exact screen bytes out.

Every expected byte string below is worked out by hand from the screen model
in picchat/editor.py's docstring:

- the input area is ``prompt + buffer`` starting at column 0, wrapped at
  ``width`` like the terminal wraps it (a wide character that does not fit in
  the last column goes whole to the next row);
- text that ends exactly at the right margin is followed by an explicit CRLF
  (the "wrap fix"), so the cursor's row is always known;
- erasing the area is ``\\r``, ``ESC[<n>A`` (n = the cursor's row in the area,
  left out when 0), ``ESC[J``.

The last tests render the editor's output through a tiny terminal emulator and
check that the screen shows exactly what the model says: the real proof that
every redraw lands where it should.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from picchat.editor import Editor, Line, QuitRequest, char_width, text_width

ERASE = b"\r\x1b[J"  # erase an input area whose cursor is on its first row


def up(n: int) -> bytes:
    return b"\r\x1b[" + str(n).encode() + b"A\x1b[J"


def started(prompt: str = "> ", width: int = 80, **kw) -> Editor:
    ed = Editor(prompt, width, **kw)
    assert ed.start() == prompt.encode()
    return ed


def typed(text: str, prompt: str = "> ", width: int = 80, **kw) -> Editor:
    ed = started(prompt, width, **kw)
    ed.feed(text.encode())
    assert ed.buffer == text
    return ed


# ---- widths --------------------------------------------------------------------------------


def test_char_widths():
    assert [char_width(c) for c in "aé日😀\u0301\u200b"] == [1, 1, 2, 2, 0, 0]
    assert text_width("a日本e\u0301") == 6


# ---- the prompt and typing -----------------------------------------------------------------


def test_start_shows_the_prompt_and_a_second_start_redraws_it():
    ed = Editor("> ", 80)
    assert ed.start() == b"> "
    assert ed.start() == ERASE + b"> "
    assert ed.redraw() == ERASE + b"> "


def test_typing_ascii_echoes_it():
    ed = started()
    assert ed.feed(b"hi") == (b"hi", [])
    assert ed.feed(b" there") == (b" there", [])
    assert ed.buffer == "hi there"


def test_tab_is_a_space_and_other_controls_are_ignored():
    ed = started()
    assert ed.feed(b"a\tb") == (b"a b", [])
    assert ed.feed(b"\x00\x01\x02\x05\x06\x0b\x0e\x1a\x1c\x1f") == (b"", [])
    assert ed.buffer == "a b"


def test_two_byte_utf8_split_across_feeds():
    ed = started()
    assert ed.feed(b"\xc3") == (b"", [])
    assert ed.buffer == ""
    assert ed.feed(b"\xa9") == (b"\xc3\xa9", [])
    assert ed.buffer == "é"


def test_wide_characters_are_echoed():
    ed = started()
    assert ed.feed("日本".encode()) == (b"\xe6\x97\xa5\xe6\x9c\xac", [])
    assert ed.buffer == "日本"


def test_an_emoji_arriving_one_byte_at_a_time():
    ed = started()
    outs = [ed.feed(bytes([b]))[0] for b in "😀".encode()]
    assert outs == [b"", b"", b"", b"\xf0\x9f\x98\x80"]
    assert ed.buffer == "😀"


def test_invalid_utf8_becomes_a_replacement_character():
    ed = started()
    assert ed.feed(b"a\xffb") == (b"a\xef\xbf\xbdb", [])
    assert ed.buffer == "a\ufffdb"


# ---- editing keys --------------------------------------------------------------------------


@pytest.mark.parametrize("key", [b"\x7f", b"\x08"])
def test_backspace_over_ascii(key):
    ed = typed("abc")
    assert ed.feed(key) == (ERASE + b"> ab", [])
    assert ed.buffer == "ab"


def test_backspace_on_an_empty_line_does_nothing():
    ed = started()
    assert ed.feed(b"\x7f\x08") == (b"", [])


@pytest.mark.parametrize("text", ["aé", "a日", "a😀"])
def test_backspace_removes_a_whole_multibyte_character(text):
    ed = typed(text)
    assert ed.feed(b"\x7f") == (ERASE + b"> a", [])
    assert ed.buffer == "a"


def test_backspace_removes_a_combining_mark_together_with_its_base():
    ed = typed("ae\u0301")  # e + COMBINING ACUTE ACCENT
    assert ed.feed(b"\x7f") == (ERASE + b"> a", [])
    assert ed.buffer == "a"
    ed = typed("ae\u0301\u0323")  # two marks on one base
    assert ed.feed(b"\x08") == (ERASE + b"> a", [])
    assert ed.buffer == "a"


def test_ctrl_u_clears_the_line():
    ed = typed("hello")
    assert ed.feed(b"\x15") == (ERASE + b"> ", [])
    assert ed.buffer == ""


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("hello big world", "hello big "),
        ("hello big  ", "hello "),  # the blanks after a word go with it
        ("hello", ""),
        ("", ""),
    ],
)
def test_ctrl_w_deletes_the_word_before_the_cursor(before, after):
    ed = typed(before)
    assert ed.feed(b"\x17") == (ERASE + b"> " + after.encode(), [])
    assert ed.buffer == after


def test_ctrl_l_clears_the_screen_and_redraws():
    ed = typed("abc")
    assert ed.feed(b"\x0c") == (b"\x1b[H\x1b[2J> abc", [])
    assert ed.buffer == "abc"


# ---- Enter ---------------------------------------------------------------------------------


@pytest.mark.parametrize("enter", [b"\r", b"\n", b"\r\n"])
def test_each_kind_of_enter_gives_one_line(enter):
    ed = typed("hi")
    assert ed.feed(enter) == (b"\r\n> ", [Line("hi")])
    assert ed.buffer == ""


def test_crlf_inside_one_feed_is_one_enter():
    ed = started()
    assert ed.feed(b"a\r\nb\n") == (b"a\r\n> b\r\n> ", [Line("a"), Line("b")])


def test_cr_then_lf_in_separate_feeds_is_one_enter():
    ed = typed("x")
    assert ed.feed(b"\r") == (b"\r\n> ", [Line("x")])
    assert ed.feed(b"\n") == (b"", [])
    assert ed.feed(b"y") == (b"y", [])  # and the next key is not swallowed
    assert ed.buffer == "y"


def test_two_crs_are_two_enters():
    ed = typed("x")
    assert ed.feed(b"\r\r\n") == (b"\r\n> \r\n> ", [Line("x"), Line("")])


def test_enter_on_an_empty_line_gives_an_empty_line():
    ed = started()
    assert ed.feed(b"\r") == (b"\r\n> ", [Line("")])


# ---- Ctrl-C and Ctrl-D ---------------------------------------------------------------------


def test_ctrl_c_with_text_drops_the_line():
    ed = typed("abc")
    assert ed.feed(b"\x03") == (b"^C\r\n> ", [])
    assert ed.buffer == ""


def test_ctrl_c_on_an_empty_line_asks_to_quit():
    ed = started()
    assert ed.feed(b"\x03") == (b"", [QuitRequest("ctrl-c")])


def test_ctrl_d_on_an_empty_line_asks_to_quit():
    ed = started()
    assert ed.feed(b"\x04") == (b"", [QuitRequest("ctrl-d")])


def test_ctrl_d_with_text_does_nothing():
    ed = typed("abc")
    assert ed.feed(b"\x04") == (b"", [])
    assert ed.buffer == "abc"


# ---- escape sequences from the terminal ------------------------------------------------------


def test_arrow_and_function_keys_are_ignored_entirely():
    ed = started()
    keys = b"a\x1b[A\x1b[B\x1b[C\x1b[D\x1bOP\x1bOA\x1b[1;5C\x1b[5~\x1b[200~b"
    assert ed.feed(keys) == (b"ab", [])
    assert ed.buffer == "ab"


def test_an_escape_sequence_split_across_feeds_is_ignored():
    ed = started()
    assert ed.feed(b"\x1b") == (b"", [])
    assert ed.feed(b"[") == (b"", [])
    assert ed.feed(b"1;2") == (b"", [])
    assert ed.feed(b"D") == (b"", [])
    assert ed.feed(b"x") == (b"x", [])
    assert ed.buffer == "x"


# ---- the max_bytes bound -------------------------------------------------------------------


def test_max_bytes_rings_the_bell_instead_of_growing():
    ed = started(max_bytes=5)
    assert ed.feed(b"abcd") == (b"abcd", [])
    assert ed.feed("é".encode()) == (b"\a", [])  # 4 + 2 bytes > 5
    assert ed.feed(b"e") == (b"e", [])
    assert ed.feed(b"fg") == (b"\a\a", [])
    assert ed.buffer == "abcde"
    assert ed.feed(b"\r") == (b"\r\n> ", [Line("abcde")])


# ---- messages arriving mid-line --------------------------------------------------------------


def test_show_erases_the_input_prints_the_message_and_redraws_the_half_typed_line():
    ed = typed("half")
    assert ed.show("bob: hi") == ERASE + b"bob: hi\r\n> half"
    assert ed.buffer == "half"
    assert ed.feed(b" done\r") == (b" done\r\n> ", [Line("half done")])


def test_show_several_lines_ends_each_with_crlf():
    ed = typed("x")
    assert ed.show("one\ntwo\r\nthree") == ERASE + b"one\r\ntwo\r\nthree\r\n> x"


def test_show_before_start_only_prints_and_draws():
    ed = Editor("> ", 80)
    assert ed.show("m") == b"m\r\n> "


def test_hide_removes_the_input_area_and_show_after_it_does_not_erase_again():
    ed = typed("abc")
    assert ed.hide() == ERASE
    assert ed.hide() == b""
    assert ed.show("m") == b"m\r\n> abc"


def test_typing_after_hide_draws_the_input_area_again():
    ed = typed("abc")
    ed.hide()
    assert ed.feed(b"d") == (b"> abcd", [])


def test_set_prompt_redraws():
    ed = typed("hi")
    assert ed.set_prompt("alice> ") == ERASE + b"alice> hi"
    assert ed.prompt == "alice> "
    assert ed.show("m") == ERASE + b"m\r\nalice> hi"


def test_resize_starts_a_fresh_input_area():
    ed = typed("abc", width=10)
    assert ed.resize(40) == b"\r\n> abc"
    assert ed.width == 40


# ---- wrapping ------------------------------------------------------------------------------


def test_a_line_wider_than_the_terminal_wraps_and_show_goes_up_one_row():
    ed = started(width=20)
    text = "abcdefghijklmnopqrstuvwxy"  # 2 + 25 columns: two rows, cursor at row 1 col 7
    # "r" ends at the margin (column 20): the explicit CRLF follows it.
    assert ed.feed(text.encode()) == (b"abcdefghijklmnopqr\r\nstuvwxy", [])
    assert ed.show("msg") == up(1) + b"msg\r\n> " + text.encode()
    assert ed.feed(b"\x7f") == (up(1) + b"> " + text[:-1].encode(), [])


def test_three_rows_go_up_two():
    ed = started(width=10)
    out, _ = ed.feed(b"a" * 8 + b"b" * 10 + b"c" * 7)
    assert out == b"aaaaaaaa\r\nbbbbbbbbbb\r\nccccccc"
    assert ed.show("x") == up(2) + b"x\r\n> " + b"a" * 8 + b"b" * 10 + b"c" * 7
    assert ed.feed(b"\x15") == (up(2) + b"> ", [])
    assert ed.show("y") == ERASE + b"y\r\n> "


def test_text_ending_exactly_at_the_margin_gets_an_explicit_crlf():
    ed = started(width=20)
    assert ed.feed(b"abcdefghijklmnopq") == (b"abcdefghijklmnopq", [])  # column 19
    assert ed.feed(b"r") == (b"r\r\n", [])  # column 20: the margin
    # The cursor is on the row below the text: erasing goes up one.
    assert ed.show("m") == up(1) + b"m\r\n> abcdefghijklmnopqr\r\n"
    assert ed.feed(b"\x7f") == (up(1) + b"> abcdefghijklmnopq", [])
    assert ed.feed(b"\x7f") == (ERASE + b"> abcdefghijklmnop", [])


def test_enter_at_the_margin_does_not_leave_a_blank_row():
    ed = started(width=10)
    assert ed.feed(b"abcdefgh") == (b"abcdefgh\r\n", [])
    # The cursor already is at the start of a fresh row.
    assert ed.feed(b"\r") == (b"> ", [Line("abcdefgh")])
    assert ed.show("m") == ERASE + b"m\r\n> "


def test_ctrl_c_at_the_margin_prints_its_mark_on_the_fresh_row():
    ed = started(width=10)
    ed.feed(b"abcdefgh")
    assert ed.feed(b"\x03") == (b"^C\r\n> ", [])


def test_a_wide_character_that_does_not_fit_in_the_last_column_goes_to_the_next_row():
    ed = started(width=10)
    assert ed.feed(b"abcdefg") == (b"abcdefg", [])  # column 9: one column left
    # 日 needs two: the terminal puts it at the start of row 1 (column 2 after it),
    # so there is no margin fix, and the cursor is on row 1.
    assert ed.feed("日".encode()) == ("日".encode(), [])
    assert ed.show("m") == up(1) + "m\r\n> abcdefg日".encode()
    assert ed.feed(b"\x7f") == (up(1) + b"> abcdefg", [])
    assert ed.show("n") == ERASE + b"n\r\n> abcdefg"


def test_a_wide_character_ending_at_the_margin_gets_the_crlf():
    ed = started(width=10)
    ed.feed(b"abcdef")  # column 8
    assert ed.feed("日".encode()) == ("日\r\n".encode(), [])
    assert ed.feed(b"\x7f") == (up(1) + b"> abcdef", [])


def test_a_combining_mark_after_the_margin_does_not_move_the_cursor_again():
    ed = started(width=10)
    assert ed.feed(b"abcdefgh") == (b"abcdefgh\r\n", [])  # "h" at the margin
    # The accent belongs to "h"; it takes no column: no second CRLF.
    assert ed.feed("\u0301".encode()) == ("\u0301".encode(), [])
    assert ed.show("m") == up(1) + "m\r\n> abcdefgh\u0301\r\n".encode()
    assert ed.feed(b"\x7f") == (up(1) + b"> abcdefg", [])


def test_set_prompt_on_a_wrapped_line_goes_up_first():
    ed = typed("abcdefghij", width=10)  # 12 columns: cursor on row 1
    assert ed.set_prompt("$ ") == up(1) + b"$ abcdefghij"
    assert ed.set_prompt("longer> ") == up(1) + b"longer> abcdefghij"
    # 8 + 10 = 18 columns: still two rows
    assert ed.show("m") == up(1) + b"m\r\nlonger> abcdefghij"


# ---- properties ----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(1, 30),
    chunks=st.lists(st.binary(max_size=24), max_size=20),
)
def test_feed_never_raises_and_the_buffer_holds_no_control_characters(width, chunks):
    ed = Editor("> ", width, max_bytes=64)
    ed.start()
    for chunk in chunks:
        out, events = ed.feed(chunk)
        out.decode("utf-8")  # always valid UTF-8
        assert all(ch.isprintable() for ch in ed.buffer)
        assert len(ed.buffer.encode()) <= 64
        for event in events:
            assert isinstance(event, (Line, QuitRequest))
            if isinstance(event, Line):
                assert all(ch.isprintable() for ch in event.text)


# A terminal emulator just big enough for what the editor writes: printable
# characters with char_width() columns, xterm's autowrap with its pending-wrap
# state, CR, LF (raw mode: no column change), BEL, ESC[nA, ESC[J, ESC[H, ESC[2J.
# Anything else the editor writes fails the test. Zero-width characters take no
# cell; they are left out of the comparison on both sides.

CONT = "<cont>"  # the right half of a wide character
_CSI = re.compile(r"\x1b\[(\d*)([A-Za-z])")


class Terminal:
    def __init__(self, width: int) -> None:
        self.width = width
        self.rows: list[list[str | None]] = [[]]
        self.r = self.c = 0
        self.pending = False  # a character was written in the last column

    def _put(self, r: int, c: int, cell: str) -> None:
        while len(self.rows) <= r:
            self.rows.append([])
        row = self.rows[r]
        row.extend([None] * (c + 1 - len(row)))
        row[c] = cell

    def _char(self, ch: str) -> None:
        w = char_width(ch)
        if w == 0:
            return
        if self.pending:
            self.r, self.c, self.pending = self.r + 1, 0, False
        if self.c + w > self.width:  # a wide character in the last column wraps whole
            self.r, self.c = self.r + 1, 0
        self._put(self.r, self.c, ch)
        if w == 2:
            self._put(self.r, self.c + 1, CONT)
        if self.c + w == self.width:
            self.c, self.pending = self.width - 1, True
        else:
            self.c += w

    def write(self, data: bytes) -> None:
        text = data.decode("utf-8")
        i = 0
        while i < len(text):
            ch = text[i]
            if ch == "\x1b":
                m = _CSI.match(text, i)
                assert m, f"unexpected escape sequence {text[i : i + 8]!r}"
                n, final = m.groups()
                if final == "A":
                    count = int(n or "1")
                    assert 1 <= count <= self.r, f"cursor up {count} from row {self.r}"
                    self.r -= count
                    self.pending = False
                elif final == "J" and n == "":
                    del self.rows[self.r + 1 :]
                    if self.r < len(self.rows):
                        del self.rows[self.r][self.c :]
                elif final == "J" and n == "2":
                    self.rows = [[]]
                elif final == "H" and n == "":
                    self.r = self.c = 0
                    self.pending = False
                else:
                    raise AssertionError(f"unexpected escape sequence {m.group()!r}")
                i = m.end()
                continue
            if ch == "\r":
                self.c, self.pending = 0, False
            elif ch == "\n":
                self.r, self.pending = self.r + 1, False
            elif ch == "\a":
                pass
            else:
                assert ch.isprintable(), f"unexpected control character {ch!r}"
                self._char(ch)
            i += 1

    def screen(self) -> list[list[str | None]]:
        rows = [list(row) for row in self.rows]
        for row in rows:
            while row and row[-1] is None:
                row.pop()
        while rows and not rows[-1]:
            rows.pop()
        return rows


def wrapped(text: str, width: int) -> tuple[list[list[str | None]], int]:
    """The rows ``text`` fills when written from column 0, and the column after it
    (``width`` when it ends at the margin)."""
    term = Terminal(width)
    term.write(text.encode())
    col = term.width if term.pending else term.c
    rows = [list(row) for row in term.rows]
    while len(rows) <= term.r:
        rows.append([])
    return rows, col


def expected_screen(blocks, prompt, buffer, width):
    """Finished blocks (messages, entered lines) above the input area, and the cursor."""
    rows = [row for block in blocks for row in block]
    area, col = wrapped(prompt + buffer, width)
    cursor = (len(rows) + len(area) - 1, col)
    if col == width:  # the wrap fix: the cursor sits at the start of the next row
        cursor = (cursor[0] + 1, 0)
    rows += area
    for row in rows:
        while row and row[-1] is None:
            row.pop()
    while rows and not rows[-1]:
        rows.pop()
    return rows, cursor


_chars = st.sampled_from(["a", "b", " ", "y", "z", "é", "ü", "日", "本", "😀", "\u0301"])
_text = st.lists(_chars, max_size=12).map("".join)
_keys = st.one_of(
    _chars,
    _chars,
    _chars,
    _chars,
    st.sampled_from(
        [
            "\x7f",
            "\x08",
            "\x15",
            "\x17",
            "\x0c",
            "\r",
            "\n",
            "\r\n",
            "\x03",
            "\x04",
            "\t",
            "\x1b[A",
            "\x1bOP",
        ]
    ),
)
_ops = st.one_of(
    st.tuples(st.just("key"), _keys, st.integers(0, 4)),
    st.tuples(st.just("key"), _keys, st.integers(0, 4)),
    st.tuples(st.just("key"), _keys, st.integers(0, 4)),
    st.tuples(st.just("key"), _keys, st.integers(0, 4)),
    st.tuples(st.just("key"), _text, st.integers(0, 40)),  # a paste
    st.tuples(st.just("show"), st.lists(_text, min_size=1, max_size=3).map("\n".join)),
    st.tuples(st.just("prompt"), st.sampled_from(["", "> ", "You (bob): ", "日> "])),
)


@settings(max_examples=400, deadline=None)
@given(
    width=st.integers(2, 24),
    prompt=st.sampled_from(["", "> ", "You (alice): ", "日本> "]),
    ops=st.lists(_ops, max_size=60),
)
def test_the_screen_always_shows_the_messages_and_the_prompt_with_the_buffer(width, prompt, ops):
    ed = Editor(prompt, width)
    term = Terminal(width)
    term.write(ed.start())
    blocks: list[list[list[str | None]]] = []  # what scrolled up: messages, entered lines
    for op in ops:
        if op[0] == "key":
            _, key, cut = op
            data = key.encode()
            before, shown_prompt = ed.buffer, ed.prompt
            events: list = []
            for piece in (data[:cut], data[cut:]):  # split anywhere, even inside a character
                out, evs = ed.feed(piece)
                term.write(out)
                events += evs
            for event in events:
                if isinstance(event, Line):
                    blocks.append(wrapped(shown_prompt + event.text, width)[0])
            if key == "\x03" and before:
                blocks.append(wrapped(shown_prompt + before + "^C", width)[0])
            if key == "\x0c":
                blocks = []
        elif op[0] == "show":
            term.write(ed.show(op[1]))
            for line in op[1].split("\n"):
                blocks.append(wrapped(line, width)[0])
        else:
            term.write(ed.set_prompt(op[1]))
        rows, cursor = expected_screen(blocks, ed.prompt, ed.buffer, width)
        assert term.screen() == rows, op
        assert (term.r, term.c) == cursor, op
        assert not term.pending
