"""Token authentication, sans I/O: secrets from files, constant-time checks,
and a per-address back-off for failed attempts.

Who needs a token (docs/security.md): a TCP connection from another machine,
unless ``allow-anonymous`` is set. Loopback TCP and the Unix socket (whose
file permissions are its access control) never do.

The back-off: each failure from an address doubles the time before that
address is judged again (``BACKOFF_BASE`` up to ``backoff_max``); an attempt
arriving meanwhile, on any connection from that address, waits until then.
So guesses from one address are serialized to one per back-off however many
connections it opens, and the failure's answer itself comes only after it.
The I/O layer waits with a loop timer, never a sleep: nobody else notices.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from collections import OrderedDict
from collections.abc import Iterable

# Imported at start, never later: an import needs a free fd, which a server
# under attack may not have. _operator's is what hmac.compare_digest falls back
# to; taking it directly spares loading OpenSSL's libcrypto (4 MB) for nothing.
try:
    from _operator import _compare_digest as compare_digest
except ImportError:  # pragma: no cover - a Python without it
    from hmac import compare_digest

BACKOFF_BASE = 1.0  # seconds after a first failure
FORGET_AFTER = 600.0  # seconds after its back-off ends, an address starts afresh
REMEMBERED = 4096  # addresses remembered at most (the oldest are forgotten)
TOKEN_MIN = 16  # characters; shorter tokens are refused as guessable


class SecretError(Exception):
    """A secret file we must not or cannot use (the message says why and what to do)."""


def read_secret(path: str, what: str = "token file") -> bytes:
    """The contents of a file only its owner may read (as ssh insists for keys)."""
    try:
        # O_NONBLOCK: a FIFO is refused below, not waited on for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise SecretError(f"{what} {path} is a directory")
            if not stat.S_ISREG(st.st_mode):
                raise SecretError(f"{what} {path} is not a regular file")
            if st.st_mode & 0o077:
                raise SecretError(
                    f"{what} {path} may be read by others (mode "
                    f"{stat.S_IMODE(st.st_mode):04o}); make it private: chmod 600 {path}"
                )
            with open(fd, "rb", closefd=False) as f:
                return f.read(1 << 16)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise SecretError(f"{what} {path} does not exist") from None
    except PermissionError:
        raise SecretError(f"{what} {path} is not readable by this user") from None
    except IsADirectoryError:
        raise SecretError(f"{what} {path} is a directory") from None


def parse_tokens(text: bytes, source: str) -> list[bytes]:
    """Tokens, one per line; blank lines and ``#`` comments are skipped. More
    than one token lets an operator rotate them without a flag day."""
    tokens = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        if len(line) < TOKEN_MIN or any(c <= 0x20 or c >= 0x7F for c in line):
            raise SecretError(
                f"{source}: a token must be at least {TOKEN_MIN} printable ASCII characters "
                "without spaces (e.g. the output of `openssl rand -hex 24`)"
            )
        tokens.append(line)
    return tokens


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, and IPv4 loopback mapped into IPv6."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class Gate:
    """The valid tokens and the memory of failed attempts, per address."""

    def __init__(self, tokens: Iterable[bytes], backoff_max: float = 30.0) -> None:
        self.tokens = list(tokens)
        self.backoff_max = backoff_max
        # address -> (failures, judged again no sooner than), oldest first
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def check(self, token: bytes) -> bool:
        """Constant time in the token's contents: every valid token is compared,
        each with compare_digest (hmac's), and nothing stops early on a match."""
        ok = False
        for valid in self.tokens:
            ok |= compare_digest(token, valid)
        return ok

    def wait(self, address: str, now: float) -> float:
        """Seconds before an attempt from ``address`` may be judged (0: now)."""
        entry = self._entry(address, now)
        return 0.0 if entry is None else max(0.0, entry[1] - now)

    def failed(self, address: str, now: float) -> float:
        """Record a failure; returns the seconds before it is answered."""
        entry = self._entry(address, now)
        count = 1 if entry is None else entry[0] + 1
        delay = min(BACKOFF_BASE * 2 ** min(count - 1, 30), self.backoff_max)
        self._failures[address] = (count, now + delay)
        self._failures.move_to_end(address)
        while len(self._failures) > REMEMBERED:
            self._failures.popitem(last=False)
        return delay

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)

    def _entry(self, address: str, now: float) -> tuple[int, float] | None:
        entry = self._failures.get(address)
        if entry is not None and now > entry[1] + FORGET_AFTER:
            del self._failures[address]
            return None
        return entry

    @property
    def remembered(self) -> int:
        return len(self._failures)


def load_tokens(token_file: str, env_token: str | None) -> list[bytes]:
    """The valid tokens: those of ``token_file`` (if set) plus ``env_token``
    (PICCHAT_TOKEN, if set). Raises SecretError with what to fix."""
    tokens = []
    if token_file:
        tokens = parse_tokens(read_secret(token_file), token_file)
        if not tokens:
            raise SecretError(
                f"token file {token_file} holds no token (one per line; "
                "`openssl rand -hex 24` makes one)"
            )
    if env_token:
        from_env = parse_tokens(env_token.encode("utf-8", "replace"), "PICCHAT_TOKEN")
        if not from_env:
            raise SecretError("PICCHAT_TOKEN is set but holds no token")
        tokens += from_env
    return tokens
