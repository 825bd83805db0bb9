"""What a client presents and checks: its token, and how it trusts the
server's certificate. One object for picchat-send and picchat-client.

The token comes from ``--token-file`` (a file only its owner may read) or the
PICCHAT_TOKEN environment variable, never from the command line, where
``ps`` would show it. It is sent as the first line, ``/auth TOKEN``; a server
that needs none ignores that line, so a client may always send it.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from pathlib import Path

from .auth import SecretError, load_tokens
from .tls import KnownHosts, check_server, client_context, known_hosts_path, parse_fingerprint

DEFAULT_TLS_PORT = 1235  # what `install.sh --tls` configures


class Credentials:
    """Immutable by convention. Its repr is object's: the token never shows."""

    __slots__ = ("token", "tls", "ca_file", "pin", "known_hosts")

    def __init__(
        self,
        token: bytes | None = None,
        tls: bool = False,
        ca_file: str | None = None,
        pin: str | None = None,  # SHA256:<base64>
        known_hosts: Path | None = None,  # None: tls.known_hosts_path()
    ) -> None:
        self.token = token
        self.tls = tls
        self.ca_file = ca_file
        self.pin = pin
        self.known_hosts = known_hosts_path() if known_hosts is None else known_hosts

    def auth_line(self) -> bytes:
        return b"/auth " + self.token + b"\n" if self.token else b""

    def context(self) -> ssl.SSLContext:
        return client_context(self.ca_file)

    def check(self, der: bytes | None, label: str) -> str | None:
        """After the handshake: a notice to show (a first fingerprint was
        recorded) or None; raises tls.CertificateMismatch. A CA file has
        verified the certificate already (in the handshake)."""
        if self.ca_file:
            return None
        return check_server(der, label, self.pin, KnownHosts(self.known_hosts))


def tls_failure(exc: OSError, label: str) -> str:
    """What to tell the user when the TLS handshake with ``label`` failed."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the certificate of {label} does not verify with the CA file: {exc.verify_message}"
    reason = getattr(exc, "reason", None) or exc
    return f"TLS with {label} failed ({reason}); is it picchat's TLS port (tls-port)?"


def from_options(
    token_file: str | None,
    tls: bool,
    ca_file: str | None,
    fingerprint: str | None,
    env: Mapping[str, str] | None = None,
) -> Credentials:
    """Raises ValueError with a message for the user (a usage error)."""
    env = os.environ if env is None else env
    try:  # the server's reading of both, the file first; a client sends the first token
        if token_file:
            tokens = load_tokens(token_file, None)
        else:
            tokens = load_tokens("", env.get("PICCHAT_TOKEN"))
    except SecretError as exc:
        raise ValueError(str(exc)) from None
    token = tokens[0] if tokens else None
    pin = parse_fingerprint(fingerprint) if fingerprint else None
    if ca_file and pin:
        raise ValueError("give --ca-file or --fingerprint, not both")
    return Credentials(token, tls or bool(ca_file or pin), ca_file, pin)
