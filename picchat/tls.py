"""TLS for picchat, with the standard library ``ssl`` only.

``TlsStream`` is TLS over memory buffers (``SSLObject`` + ``MemoryBIO``): raw
bytes in, plaintext out and back, no socket and no blocking. The server's
loop and picchat-client move the raw bytes themselves, so a handshake is just
more input and output in the selectors loop: a peer that connects and says
nothing delays no one, and is dropped at the login timeout.

Trust, for clients (docs/security.md): a CA file (``--ca-file``), or a pinned
certificate fingerprint (``--fingerprint SHA256:...``, printed by
``picchat-server --print-fingerprint``), or else trust on first use: the first
fingerprint seen for a host:port is recorded in known_hosts and a different
one later is refused, as ssh does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path

from .auth import SecretError, read_secret

RECORD = 16384  # the largest TLS record's plaintext: one write, one record


class TlsStream:
    """One TLS connection's state; the caller moves raw bytes both ways."""

    __slots__ = ("_in", "_out", "_obj", "_unsent", "handshaken", "eof")

    def __init__(
        self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=server_hostname
        )
        self.handshaken = False
        self.eof = False  # the peer ended the stream (close_notify or its TCP FIN)
        self._unsent = bytearray()  # ciphertext the kernel has not taken yet (see send)

    def start(self) -> None:
        """A client's first step: its hello goes out with ``take_output``."""
        self._handshake()

    def receive(self, raw: bytes) -> bytes:
        """Feed raw bytes from the peer (``b""``: it closed TCP); returns the
        plaintext they complete. Raises ssl.SSLError if the peer breaks TLS
        or fails verification, ConnectionError if it leaves mid-handshake."""
        if raw:
            self._in.write(raw)
        else:
            self._in.write_eof()
        if not self.handshaken and not self._handshake():
            if not raw:
                raise ConnectionError("closed during the TLS handshake")
            return b""
        chunks = []
        while not self.eof:
            try:
                chunk = self._obj.read(RECORD)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                # close_notify, or TCP closed without it: the end either way
                # (a truncated line is then just the last, partial line).
                self.eof = True
                break
            if not chunk:
                self.eof = True
                break
            chunks.append(chunk)
        if not raw:
            self.eof = True
        return b"".join(chunks)

    def _handshake(self) -> bool:
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        self.handshaken = True
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Encrypt the first record's worth of ``data``; returns how many bytes
        were taken (their ciphertext waits in ``take_output``)."""
        chunk = memoryview(data)[:RECORD]
        return self._obj.write(chunk) if chunk else 0

    def send(self, send: Callable[[bytearray], int], out: bytearray) -> None:
        """Hand ``send`` (a non-blocking socket's) what it takes: the ciphertext
        made already, then ``out`` a record at a time, deleting from ``out``
        what was encrypted. A record is encrypted only once the last one has
        gone, so at most one record of ciphertext waits besides ``out``.
        ``send``'s BlockingIOError (the kernel is full) and OSError propagate."""
        while True:
            if self._out.pending:
                self._unsent += self._out.read()
            while self._unsent:
                del self._unsent[: send(self._unsent)]
            if not out or not self.handshaken:
                return
            del out[: self.write(out)]

    @property
    def unsent(self) -> bool:
        """Ciphertext waits to be sent (call ``send`` when the socket is writable)."""
        return bool(self._unsent) or self._out.pending > 0

    def take_output(self) -> bytes:
        """Raw bytes to send to the peer."""
        return self._out.read()

    @property
    def output_pending(self) -> bool:
        return self._out.pending > 0

    def close(self) -> bytes:
        """Our close_notify, to send before closing the socket (best effort)."""
        if self.handshaken:
            try:
                self._obj.unwrap()
            except ssl.SSLError:  # it waits for the peer's reply, which we do not
                pass
        return self._out.read()

    def peer_certificate(self) -> bytes | None:
        return self._obj.getpeercert(binary_form=True)

    def describe(self) -> str:
        cipher = self._obj.cipher()
        return f"{self._obj.version()} {cipher[0] if cipher else ''}".strip()


# ---- the server's side ---------------------------------------------------------


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """The TLS listener's context; raises SecretError with what to fix."""
    read_secret(key, "TLS key file")  # refused if others may read it
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError:
        raise SecretError(f"TLS certificate file {cert} does not exist") from None
    except (ssl.SSLError, OSError) as exc:
        raise SecretError(
            f"cannot use the TLS certificate {cert} with the key {key}: "
            f"{getattr(exc, 'reason', None) or exc}"
        ) from None
    return ctx


def cert_fingerprint(path: str) -> str:
    """The fingerprint of the first certificate in a PEM file."""
    try:
        pem = Path(path).read_text("ascii")
        # The first certificate block only (a full chain has more; text may
        # precede it), as the server presents it: PEM_cert_to_DER_cert would
        # decode a whole chain's base64 as one certificate.
        start = pem.find(ssl.PEM_HEADER)
        end = pem.find(ssl.PEM_FOOTER, start)
        if start < 0 or end < 0:
            raise ValueError(f"no {ssl.PEM_HEADER} block")
        der = ssl.PEM_cert_to_DER_cert(pem[start : end + len(ssl.PEM_FOOTER)])
    except FileNotFoundError:
        raise SecretError(f"TLS certificate file {path} does not exist") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise SecretError(f"TLS certificate file {path} is not a PEM certificate: {exc}") from None
    return fingerprint(der)


# ---- fingerprints and trust ------------------------------------------------------


def fingerprint(der: bytes) -> str:
    """SHA256:<base64>, ssh's notation; the same hash as ``openssl x509
    -fingerprint -sha256`` prints in hex."""
    digest = hashlib.sha256(der).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def parse_fingerprint(text: str) -> str:
    """Accept ``SHA256:<base64>`` or the hex that openssl prints (with or
    without colons); returns the ``SHA256:<base64>`` form. Raises ValueError."""
    s = text.strip()
    if "=" in s and "fingerprint" in s.lower():  # openssl's whole "sha256 Fingerprint=AB:..."
        s = s.split("=", 1)[1].strip()
    body = s[7:] if s[:7].upper() == "SHA256:" else s
    hexdigits = body.replace(":", "")
    digest: bytes | None = None
    if len(hexdigits) == 64:
        try:
            digest = bytes.fromhex(hexdigits)
        except ValueError:
            digest = None
    if digest is None:
        try:
            digest = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
        except (binascii.Error, ValueError):
            digest = None
    if digest is None or len(digest) != 32:
        raise ValueError(
            f"{text!r} is not a SHA-256 fingerprint (SHA256:<base64>, as "
            "`picchat-server --print-fingerprint` prints, or 64 hex digits)"
        )
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def client_context(ca_file: str | None) -> ssl.SSLContext:
    """With a CA file: full verification, host name included. Without: the
    chain is not checked here; the caller checks the fingerprint (pin/TOFU)."""
    if ca_file:
        try:
            ctx = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise SecretError(f"cannot use the CA file {ca_file}: {exc}") from None
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def known_hosts_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or os.path.join(env.get("HOME") or "~", ".config")
    return Path(os.path.expanduser(base)) / "picchat" / "known_hosts"


class CertificateMismatch(Exception):
    """The server's certificate is not the one expected: refuse, loudly."""


class KnownHosts:
    """``host:port SHA256:...`` lines, one per server, first seen first."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lookup(self, label: str) -> tuple[int, str] | None:
        """(line number, fingerprint) recorded for ``label``, if any."""
        try:
            lines = self.path.read_text("utf-8").splitlines()
        except FileNotFoundError:
            return None
        for number, line in enumerate(lines, 1):
            parts = line.split()
            if len(parts) >= 2 and parts[0] == label:
                return number, parts[1]
        return None

    def record(self, label: str, fp: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(f"{label} {fp}\n")


def check_server(der: bytes | None, label: str, pin: str | None, known: KnownHosts) -> str | None:
    """Check the certificate a server presented (when no CA file verified it).
    Returns a notice to show (a first fingerprint recorded), None if it is
    the pinned or recorded one; raises CertificateMismatch otherwise."""
    if der is None:
        raise CertificateMismatch(f"the server at {label} presented no certificate")
    seen = fingerprint(der)
    if pin is not None:
        if seen != pin:
            raise CertificateMismatch(
                f"the server at {label} presented the certificate {seen}, not the pinned "
                f"{pin}: refusing to connect. Someone may be intercepting the connection, or "
                "the certificate was replaced; check with `picchat-server --print-fingerprint` "
                "on the server."
            )
        return None
    entry = known.lookup(label)
    if entry is None:
        known.record(label, seen)
        return (
            f"first connection to {label}: recorded its certificate {seen} in {known.path}; "
            "compare it with `picchat-server --print-fingerprint` on the server"
        )
    number, recorded = entry
    if recorded != seen:
        raise CertificateMismatch(
            "@@@ WARNING: THE SERVER'S CERTIFICATE HAS CHANGED @@@\n"
            f"The server at {label} presented {seen},\n"
            f"but {known.path} (line {number}) records {recorded}.\n"
            "Someone may be intercepting the connection (or the server got a new "
            "certificate).\nRefusing to connect. If you replaced the certificate "
            f"yourself, delete line {number} of {known.path} and connect again."
        )
    return None
