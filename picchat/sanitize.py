"""Turning untrusted bytes into text that is safe to show on anyone's terminal.

Whatever one participant sends, no other participant's terminal may receive a
control character or an escape sequence from it: no cursor movement, no colour,
no window-title change, no terminal query whose answer would be typed back. So:

- invalid UTF-8 becomes U+FFFD (never an exception);
- telnet IAC commands (0xFF ...) are removed: a telnet client sends them for
  Ctrl-C and the like, and 0xFF can never occur in UTF-8 text (the options
  telnet asks for are refused: ``TelnetRefusals``);
- ESC-introduced sequences (CSI, OSC, DCS, SOS, PM, APC and two-byte ESC
  sequences) are removed whole, so no printable debris is left behind;
- the remaining C0 controls except TAB, DEL and the C1 controls U+0080-U+009F
  are removed;
- lone surrogates (which JSON can carry) become U+FFFD.
"""

from __future__ import annotations

import re

_IAC = 0xFF
_SB = 0xFA
_SE = 0xF0
_WILL_WONT_DO_DONT = range(0xFB, 0xFF)
_WILL, _WONT, _DO, _DONT = 0xFB, 0xFC, 0xFD, 0xFE

# ESC (or its 8-bit C1 forms) followed by the rest of the sequence. String
# sequences (OSC, DCS, SOS, PM, APC) run to BEL or ST; an unterminated one runs
# to the end of the line, which is the end of what we will ever see of it.
_ESCAPES = re.compile(
    r"""
      (?:\x1b\[|\x9b)[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]?      # CSI
    | (?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f]).*?(?:\x07|\x1b\\|\x9c|$)  # strings
    | \x1b[\x20-\x2f]*[\x30-\x7e]?                            # other ESC seqs
    """,
    re.VERBOSE | re.DOTALL,
)
_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
# Lone surrogates can come out of JSON ("\\ud800") but cannot be encoded.
_SURROGATES = re.compile(r"[\ud800-\udfff]")


class TelnetRefusals:
    """Replies refusing each option a telnet client asks for, as its bytes
    arrive in chunks cut anywhere: WONT to DO, DONT to WILL (RFC 854). A
    telnet client needs them: after Ctrl-C it sends IAC IP, IAC DO
    TIMING-MARK and discards all output until the answer comes. Refusing
    never starts a negotiation loop (RFC 1143)."""

    __slots__ = ("_state", "_verb")

    _DATA, _COMMAND, _OPTION, _SUB, _SUB_IAC = range(5)

    def __init__(self) -> None:
        self._state = self._DATA
        self._verb = 0

    def feed(self, data: bytes) -> bytes:
        if self._state == self._DATA and _IAC not in data:
            return b""
        out = bytearray()
        state, i, n = self._state, 0, len(data)
        while i < n:
            if state == self._DATA:
                i = data.find(_IAC, i)
                if i < 0:
                    break
                state = self._COMMAND
            else:
                b = data[i]
                if state == self._COMMAND:
                    if b in _WILL_WONT_DO_DONT:
                        state, self._verb = self._OPTION, b
                    else:  # IAC IAC (a literal 0xFF), SB, or a command such as IP
                        state = self._SUB if b == _SB else self._DATA
                elif state == self._OPTION:
                    if self._verb == _DO:
                        out += bytes((_IAC, _WONT, b))
                    elif self._verb == _WILL:
                        out += bytes((_IAC, _DONT, b))
                    state = self._DATA
                elif state == self._SUB:  # skip to its IAC (at C speed, as for data)
                    j = data.find(_IAC, i)
                    if j < 0:
                        break
                    i, state = j, self._SUB_IAC
                else:  # IAC inside a subnegotiation: IAC SE ends it, IAC IAC is data
                    state = self._DATA if b == _SE else self._SUB
            i += 1
        self._state = state
        return bytes(out)


def strip_telnet(data: bytes) -> bytes:
    """Remove telnet IAC command sequences; IAC IAC stands for a literal 0xFF."""
    if _IAC not in data:
        return data
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b != _IAC:
            out.append(b)
            i += 1
            continue
        cmd = data[i + 1] if i + 1 < n else None
        if cmd == _IAC:
            out.append(_IAC)
            i += 2
        elif cmd == _SB:  # subnegotiation: skip to IAC SE
            end = data.find(bytes((_IAC, _SE)), i + 2)
            i = n if end < 0 else end + 2
        elif cmd in _WILL_WONT_DO_DONT:
            i += 3
        else:
            i += 2
    return bytes(out)


def clean_text(text: str) -> str:
    """Remove escape sequences and control characters (TAB stays)."""
    if text.isprintable():  # the common case: nothing to do
        return text
    return _SURROGATES.sub("\ufffd", _CONTROLS.sub("", _ESCAPES.sub("", text)))


def clean_bytes(data: bytes) -> str:
    """Decode one received line into safe text."""
    return clean_text(strip_telnet(data).decode("utf-8", "replace"))
