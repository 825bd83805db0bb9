"""Turning untrusted bytes into text that is safe to show on anyone's terminal.

Whatever one participant sends, no other participant's terminal may receive a
control character or an escape sequence from it: no cursor movement, no colour,
no window-title change, no terminal query whose answer would be typed back. So:

- invalid UTF-8 becomes U+FFFD (never an exception);
- telnet IAC commands (0xFF ...) are removed: a telnet client sends them for
  Ctrl-C and the like, and 0xFF can never occur in UTF-8 text;
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
