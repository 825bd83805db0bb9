"""TLS over memory buffers: a server and a client TlsStream pumped into each
other in memory (no sockets), contexts, fingerprints, pins and known_hosts.

Certificates are made with the ``openssl`` command once per module."""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import shutil
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from picchat.auth import SecretError
from picchat.tls import (
    RECORD,
    CertificateMismatch,
    KnownHosts,
    TlsStream,
    cert_fingerprint,
    check_server,
    client_context,
    fingerprint,
    known_hosts_path,
    parse_fingerprint,
    server_context,
)

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")


class Pair:
    """A certificate and its key, in PEM files."""

    def __init__(self, directory: Path, name: str, cn: str = "picchat") -> None:
        self.cert = str(directory / f"{name}.pem")
        self.key = str(directory / f"{name}.key")
        subprocess.run(
            [
                str(OPENSSL),
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                f"/CN={cn}",
                "-addext",
                f"subjectAltName=DNS:{cn}",
                "-days",
                "30",
                "-keyout",
                self.key,
                "-out",
                self.cert,
            ],
            check=True,
            capture_output=True,
        )
        os.chmod(self.key, 0o600)
        self.der = ssl.PEM_cert_to_DER_cert(Path(self.cert).read_text())


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Pair]:
    directory = tmp_path_factory.mktemp("certs")
    return {name: Pair(directory, name) for name in ("a", "b")}


@pytest.fixture(scope="module")
def server_ctx(certs) -> ssl.SSLContext:
    return server_context(certs["a"].cert, certs["a"].key)


def pump(server: TlsStream, client: TlsStream, rounds: int = 10) -> tuple[bytes, bytes]:
    """Move raw bytes both ways until neither side has any to send; returns
    the plaintext each side received (server's, client's)."""
    to_server, to_client = bytearray(), bytearray()
    for _ in range(rounds):
        moved = False
        raw = client.take_output()
        if raw:
            to_server += server.receive(raw)
            moved = True
        raw = server.take_output()
        if raw:
            to_client += client.receive(raw)
            moved = True
        if not moved:
            return bytes(to_server), bytes(to_client)
    raise AssertionError("the streams kept talking")


def connect(server_ctx, client_ctx=None, hostname=None) -> tuple[TlsStream, TlsStream]:
    server = TlsStream(server_ctx, server_side=True)
    client = TlsStream(
        client_ctx or client_context(None), server_side=False, server_hostname=hostname
    )
    client.start()
    assert client.output_pending  # its hello
    assert pump(server, client) == (b"", b"")
    return server, client


def send_all(sender: TlsStream, data: bytes) -> list[bytes]:
    """Write ``data`` as the server's loop does: ``write`` takes a record at most."""
    records, view = [], memoryview(data)
    while view:
        taken = sender.write(view)
        assert 0 < taken <= RECORD
        view = view[taken:]
        records.append(sender.take_output())
    return records


# ---- the handshake and data -----------------------------------------------------------


def test_handshake_in_memory(server_ctx, certs):
    server, client = connect(server_ctx)
    assert server.handshaken and client.handshaken
    assert not server.eof and not client.eof
    assert not server.output_pending and not client.output_pending
    assert client.peer_certificate() == certs["a"].der
    assert server.peer_certificate() is None  # clients present none
    assert server.describe().startswith("TLSv1.")


def test_nothing_is_handshaken_before_the_peer_answers(server_ctx):
    server = TlsStream(server_ctx, server_side=True)
    client = TlsStream(client_context(None), server_side=False)
    assert not client.handshaken and not server.handshaken
    client.start()
    hello = client.take_output()
    assert hello[:1] == b"\x16"  # a handshake record
    assert not client.output_pending
    assert server.receive(hello[:5]) == b""  # a partial record: nothing yet
    assert not server.handshaken and not server.output_pending
    assert server.receive(hello[5:]) == b""
    assert server.output_pending  # its reply
    assert not client.handshaken


def test_data_both_ways(server_ctx):
    server, client = connect(server_ctx)
    for record in send_all(client, b"/auth token\nhello\n"):
        assert server.receive(record) == b"/auth token\nhello\n"
    for record in send_all(server, b"* Welcome\n"):
        assert client.receive(record) == b"* Welcome\n"


def test_more_than_a_record_takes_several(server_ctx):
    server, client = connect(server_ctx)
    data = os.urandom(3 * RECORD + 1234)
    records = send_all(server, data)
    assert len(records) == 4
    received = b"".join(client.receive(r) for r in records)
    assert received == data
    # All at once, and in awkward pieces, the other way.
    raw = b"".join(send_all(client, data))
    assert server.receive(raw) == data
    raw = b"".join(send_all(client, data[::-1]))
    pieces = [raw[i : i + 1000] for i in range(0, len(raw), 1000)]
    assert b"".join(server.receive(p) for p in pieces) == data[::-1]


def test_send_hands_over_what_the_kernel_takes_a_record_at_a_time(server_ctx):
    server, client = connect(server_ctx)
    data = os.urandom(3 * RECORD + 1234)
    out = bytearray(data)
    wire = bytearray()
    room = 0  # bytes the fake kernel takes before it is full

    def kernel_send(buf: bytearray) -> int:
        nonlocal room
        if room == 0:
            raise BlockingIOError
        taken = min(room, len(buf), 5000)
        wire.extend(buf[:taken])
        room -= taken
        return taken

    with pytest.raises(BlockingIOError):
        server.send(kernel_send, out)
    assert len(out) == len(data) - RECORD  # one record encrypted, none sent: no more
    assert server.unsent
    sends = 0
    while out or server.unsent:
        sends += 1
        assert sends < 100
        room = 7000
        try:
            server.send(kernel_send, out)
        except BlockingIOError:
            assert len(data) - len(out) - len(wire) <= 2 * RECORD  # one record waits, at most
    assert not server.unsent
    assert client.receive(bytes(wire)) == data


def test_write_takes_one_record_at_most(server_ctx):
    server, _ = connect(server_ctx)
    assert server.write(b"x" * (RECORD + 1)) == RECORD
    assert server.write(bytearray(b"abc")) == 3
    assert server.write(b"") == 0
    assert server.output_pending


def test_close_notify_ends_the_stream(server_ctx):
    server, client = connect(server_ctx)
    client.write(b"last words\n")
    raw = client.take_output() + client.close()
    assert server.receive(raw) == b"last words\n"
    assert server.eof
    assert server.receive(b"") == b""  # then TCP closes: still nothing more
    assert server.eof


def test_server_close_notify_reaches_the_client(server_ctx):
    server, client = connect(server_ctx)
    bye = server.close()
    assert bye
    assert client.receive(bye) == b""
    assert client.eof


def test_tcp_closed_without_close_notify(server_ctx):
    server, client = connect(server_ctx)
    client.write(b"partial")
    assert server.receive(client.take_output()) == b"partial"
    assert not server.eof
    assert server.receive(b"") == b""
    assert server.eof


def test_close_before_the_handshake_sends_nothing(server_ctx):
    server = TlsStream(server_ctx, server_side=True)
    assert server.close() == b""


def test_closed_during_the_handshake(server_ctx):
    server = TlsStream(server_ctx, server_side=True)
    client = TlsStream(client_context(None), server_side=False)
    client.start()
    server.receive(client.take_output()[:20])
    with pytest.raises((ssl.SSLError, ConnectionError)):
        server.receive(b"")
    assert not server.handshaken


def test_plaintext_on_the_tls_port_is_an_ssl_error(server_ctx):
    for garbage in (b"GET / HTTP/1.0\r\n\r\n", b"/auth secret\n", b"PICCHAT/1 {}\n"):
        server = TlsStream(server_ctx, server_side=True)
        with pytest.raises(ssl.SSLError):
            server.receive(garbage)
        assert not server.handshaken


def test_garbage_after_the_handshake_is_an_ssl_error(server_ctx):
    server, _ = connect(server_ctx)
    with pytest.raises(ssl.SSLError):
        server.receive(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # an undecryptable record


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_a_server_refuses_old_tls(server_ctx):
    ctx = client_context(None)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    client = TlsStream(ctx, server_side=False)
    try:
        client.start()
    except ssl.SSLError as exc:
        pytest.skip(f"this OpenSSL cannot offer TLS 1.1: {exc}")
    server = TlsStream(server_ctx, server_side=True)
    with pytest.raises(ssl.SSLError, match=r"UNSUPPORTED_PROTOCOL|unsupported protocol"):
        server.receive(client.take_output())
    assert not server.handshaken


# ---- contexts ---------------------------------------------------------------------------


def test_server_context(server_ctx):
    assert server_ctx.minimum_version is ssl.TLSVersion.TLSv1_2


def test_server_context_refuses_a_key_others_may_read(certs, tmp_path):
    key = tmp_path / "key.pem"
    shutil.copy(certs["a"].key, key)
    key.chmod(0o640)
    with pytest.raises(SecretError, match="chmod 600"):
        server_context(certs["a"].cert, str(key))


def test_server_context_missing_files(certs, tmp_path):
    with pytest.raises(SecretError, match="does not exist"):
        server_context(certs["a"].cert, str(tmp_path / "nokey.pem"))
    with pytest.raises(SecretError, match=r"certificate .* does not exist"):
        server_context(str(tmp_path / "nocert.pem"), certs["a"].key)


def test_server_context_refuses_a_key_of_another_certificate(certs):
    with pytest.raises(SecretError) as info:
        server_context(certs["a"].cert, certs["b"].key)
    assert certs["a"].cert in str(info.value) and certs["b"].key in str(info.value)


def test_server_context_refuses_garbage(certs, tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(SecretError, match="cannot use"):
        server_context(str(bad), certs["a"].key)
    badkey = tmp_path / "bad.key"
    badkey.write_text("not a key\n")
    badkey.chmod(0o600)
    with pytest.raises(SecretError, match="cannot use"):
        server_context(certs["a"].cert, str(badkey))


def test_client_context_without_a_ca_checks_nothing_itself():
    ctx = client_context(None)
    assert ctx.verify_mode is ssl.CERT_NONE
    assert not ctx.check_hostname
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2


def test_client_context_with_a_ca_verifies(certs, server_ctx):
    ctx = client_context(certs["a"].cert)
    assert ctx.verify_mode is ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
    server, client = connect(server_ctx, ctx, "picchat")
    assert client.handshaken and server.handshaken


def test_a_ca_client_refuses_the_wrong_host_name(certs, server_ctx):
    ctx = client_context(certs["a"].cert)
    with pytest.raises(ssl.SSLCertVerificationError, match=r"picchat.example|Hostname"):
        connect(server_ctx, ctx, "picchat.example")


def test_a_ca_client_refuses_a_certificate_of_another_ca(certs, server_ctx):
    ctx = client_context(certs["b"].cert)
    with pytest.raises(ssl.SSLCertVerificationError):
        connect(server_ctx, ctx, "picchat")


def test_the_server_hears_of_a_refusing_client(certs, server_ctx):
    ctx = client_context(certs["b"].cert)
    server = TlsStream(server_ctx, server_side=True)
    client = TlsStream(ctx, server_side=False, server_hostname="picchat")
    client.start()
    server.receive(client.take_output())
    with pytest.raises(ssl.SSLCertVerificationError):
        client.receive(server.take_output())
    alert = client.take_output()  # the client's alert
    with pytest.raises(ssl.SSLError):
        server.receive(alert)


def test_client_context_with_a_bad_ca_file(tmp_path):
    with pytest.raises(SecretError, match="cannot use the CA file"):
        client_context(str(tmp_path / "missing.pem"))
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnonsense\n-----END CERTIFICATE-----\n")
    with pytest.raises(SecretError, match="cannot use the CA file"):
        client_context(str(bad))


# ---- fingerprints -----------------------------------------------------------------------


def test_fingerprint_is_sha256_in_unpadded_base64():
    der = b"not really a certificate"
    digest = hashlib.sha256(der).digest()
    fp = fingerprint(der)
    assert fp == "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
    assert len(fp) == 7 + 43 and not fp.endswith("=")


def test_cert_fingerprint_matches_openssl(certs):
    for pair in certs.values():
        out = subprocess.run(
            [str(OPENSSL), "x509", "-in", pair.cert, "-noout", "-fingerprint", "-sha256"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        # "sha256 Fingerprint=AB:CD:..." (OpenSSL 3) or "SHA256 Fingerprint=..." (1.1)
        label, _, hexfp = out.strip().partition("=")
        assert label.lower() == "sha256 fingerprint"
        assert parse_fingerprint(hexfp) == cert_fingerprint(pair.cert)
        assert cert_fingerprint(pair.cert) == fingerprint(pair.der)
    assert cert_fingerprint(certs["a"].cert) != cert_fingerprint(certs["b"].cert)


def test_cert_fingerprint_is_what_the_server_presents(certs, server_ctx):
    _, client = connect(server_ctx)
    assert fingerprint(client.peer_certificate()) == cert_fingerprint(certs["a"].cert)


def test_cert_fingerprint_of_a_chain_is_the_first_certificate(certs, tmp_path):
    """A full chain (leaf first, as the server sends it) gives the leaf's fingerprint,
    whatever the length of the leaf."""
    leaf, other = certs["a"], certs["b"]
    chain = tmp_path / "fullchain.pem"
    chain.write_text(Path(leaf.cert).read_text() + Path(other.cert).read_text())
    assert cert_fingerprint(str(chain)) == fingerprint(leaf.der)
    # The leaf's base64 without padding ('=') is the case that once went wrong.
    for length in range(3):
        der = leaf.der + b"\x00" * length
        fake = tmp_path / f"fake{length}.pem"
        fake.write_text(ssl.DER_cert_to_PEM_cert(der) + Path(other.cert).read_text())
        assert cert_fingerprint(str(fake)) == fingerprint(der), length


def test_cert_fingerprint_skips_text_before_the_certificate(certs, tmp_path):
    path = tmp_path / "with-text.pem"
    path.write_text(
        "Bag Attributes\n    friendlyName: picchat\n" + Path(certs["a"].cert).read_text()
    )
    assert cert_fingerprint(str(path)) == fingerprint(certs["a"].der)
    combined = tmp_path / "combined.pem"  # key first, then the certificate
    combined.write_text(Path(certs["a"].key).read_text() + Path(certs["a"].cert).read_text())
    assert cert_fingerprint(str(combined)) == fingerprint(certs["a"].der)


def test_cert_fingerprint_refuses_what_is_not_a_certificate(certs, tmp_path):
    with pytest.raises(SecretError, match="does not exist"):
        cert_fingerprint(str(tmp_path / "missing.pem"))
    for name, content in [
        ("text.pem", b"hello\n"),
        ("key.pem", Path(certs["a"].key).read_bytes()),
        ("binary.pem", b"\xff\xfe\x00"),
        ("der.pem", certs["a"].der),
    ]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(SecretError, match="not a PEM certificate"):
            cert_fingerprint(str(path))


def test_parse_fingerprint_accepts_the_forms_people_paste(certs):
    der = certs["a"].der
    fp = fingerprint(der)
    digest = hashlib.sha256(der).digest()
    hexfp = digest.hex()
    for text in (
        fp,
        "sha256:" + fp[7:],
        "  " + fp + "\n",
        fp[7:],  # without the prefix
        fp + "=",  # with base64 padding
        hexfp,
        hexfp.upper(),
        ":".join(hexfp[i : i + 2] for i in range(0, 64, 2)).upper(),  # openssl's form
        ":".join(hexfp[i : i + 2] for i in range(0, 64, 2)),
        "SHA256:" + hexfp,
    ):
        assert parse_fingerprint(text) == fp, text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "SHA256:",
        "SHA256:abc",
        "SHA1:" + "a" * 40,
        "a" * 63,
        "a" * 65,
        "g" * 64,
        "SHA256:" + base64.b64encode(b"x" * 31).decode(),  # 31 bytes
        "SHA256:" + base64.b64encode(b"x" * 33).decode(),  # 33 bytes
        "SHA256:" + base64.b64encode(b"x" * 32).decode().rstrip("=") + "!",
        hashlib.sha1(b"x").hexdigest(),
        "AB:CD:" * 10,
        "ab cd " + "ab" * 30,
    ],
)
def test_parse_fingerprint_refuses_anything_else(text):
    with pytest.raises(ValueError, match="not a SHA-256 fingerprint"):
        parse_fingerprint(text)


@given(st.binary(min_size=32, max_size=32))
def test_parse_fingerprint_round_trips(digest):
    fp = "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
    assert parse_fingerprint(fp) == fp
    assert parse_fingerprint(digest.hex()) == fp
    assert parse_fingerprint(":".join(f"{b:02X}" for b in digest)) == fp


# ---- pins, trust on first use and known_hosts ---------------------------------------------


def test_known_hosts_path():
    assert known_hosts_path({"XDG_CONFIG_HOME": "/x/conf", "HOME": "/home/u"}) == Path(
        "/x/conf/picchat/known_hosts"
    )
    assert known_hosts_path({"HOME": "/home/u"}) == Path("/home/u/.config/picchat/known_hosts")
    assert known_hosts_path({"HOME": "/home/u", "XDG_CONFIG_HOME": ""}) == Path(
        "/home/u/.config/picchat/known_hosts"
    )


def test_known_hosts_record_and_lookup(tmp_path):
    path = tmp_path / "conf" / "picchat" / "known_hosts"
    known = KnownHosts(path)
    assert known.lookup("pi.local:1235") is None  # no file yet
    known.record("pi.local:1235", "SHA256:one")
    known.record("other:1235", "SHA256:two")
    assert known.lookup("pi.local:1235") == (1, "SHA256:one")
    assert known.lookup("other:1235") == (2, "SHA256:two")
    assert known.lookup("pi.local:1236") is None
    assert known.lookup("pi.local") is None
    assert path.read_text() == "pi.local:1235 SHA256:one\nother:1235 SHA256:two\n"


def test_known_hosts_is_private(tmp_path):
    path = tmp_path / "conf" / "picchat" / "known_hosts"
    KnownHosts(path).record("pi.local:1235", "SHA256:one")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_known_hosts_skips_lines_it_does_not_understand(tmp_path):
    path = tmp_path / "known_hosts"
    path.write_text("\n# a comment\nbroken\npi.local:1235 SHA256:one extra words\n")
    assert KnownHosts(path).lookup("pi.local:1235") == (4, "SHA256:one")
    assert KnownHosts(path).lookup("broken") is None


def test_a_pinned_certificate_is_accepted_and_nothing_recorded(certs, tmp_path):
    known = KnownHosts(tmp_path / "known_hosts")
    pin = cert_fingerprint(certs["a"].cert)
    assert check_server(certs["a"].der, "pi.local:1235", pin, known) is None
    assert not known.path.exists()


def test_a_client_pinned_to_another_certificate_is_refused(certs, server_ctx, tmp_path):
    known = KnownHosts(tmp_path / "known_hosts")
    pin = cert_fingerprint(certs["b"].cert)
    _, client = connect(server_ctx)  # the server presents a
    with pytest.raises(CertificateMismatch) as info:
        check_server(client.peer_certificate(), "pi.local:1235", pin, known)
    message = str(info.value)
    assert pin in message
    assert fingerprint(certs["a"].der) in message
    assert "pi.local:1235" in message
    assert not known.path.exists()  # a pin never records anything


def test_no_certificate_is_refused(tmp_path):
    known = KnownHosts(tmp_path / "known_hosts")
    with pytest.raises(CertificateMismatch, match="no certificate"):
        check_server(None, "pi.local:1235", None, known)
    with pytest.raises(CertificateMismatch, match="no certificate"):
        check_server(None, "pi.local:1235", "SHA256:x", known)


def test_trust_on_first_use(certs, tmp_path):
    known = KnownHosts(tmp_path / "picchat" / "known_hosts")
    a, b = certs["a"].der, certs["b"].der
    notice = check_server(a, "pi.local:1235", None, known)
    assert notice is not None
    assert "pi.local:1235" in notice and fingerprint(a) in notice and str(known.path) in notice
    assert known.lookup("pi.local:1235") == (1, fingerprint(a))
    assert check_server(a, "pi.local:1235", None, known) is None  # the same again: silent
    assert check_server(b, "other:1235", None, known) is not None  # another server: its own
    with pytest.raises(CertificateMismatch) as info:
        check_server(b, "pi.local:1235", None, known)
    message = str(info.value)
    assert "WARNING" in message
    assert fingerprint(a) in message and fingerprint(b) in message
    assert f"{known.path} (line 1)" in message
    assert f"delete line 1 of {known.path}" in message
    # Refused, and nothing was changed: still refused, the first one still accepted.
    assert known.lookup("pi.local:1235") == (1, fingerprint(a))
    with pytest.raises(CertificateMismatch):
        check_server(b, "pi.local:1235", None, known)
    assert check_server(a, "pi.local:1235", None, known) is None


def test_a_changed_certificate_names_its_line(certs, tmp_path):
    known = KnownHosts(tmp_path / "known_hosts")
    known.record("first:1", "SHA256:x")
    known.record("second:1", "SHA256:y")
    check_server(certs["a"].der, "pi.local:1235", None, known)
    with pytest.raises(CertificateMismatch, match=r"\(line 3\)"):
        check_server(certs["b"].der, "pi.local:1235", None, known)


# ---- whatever a peer sends to the TLS port ----------------------------------------------------


@pytest.fixture(scope="module")
def client_hello(server_ctx) -> bytes:
    client = TlsStream(client_context(None), server_side=False)
    client.start()
    return client.take_output()


def mutate(data: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for position, value in flips:
        out[position % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


def feed_server(server_ctx, chunks: list[bytes], end: bool) -> None:
    """Only the documented outcomes: no plaintext (nobody finished a handshake),
    or ssl.SSLError, or ConnectionError."""
    server = TlsStream(server_ctx, server_side=True)
    try:
        for chunk in [*chunks, *([b""] if end else [])]:
            assert server.receive(chunk) == b""
            server.take_output()
    except (ssl.SSLError, ConnectionError):
        pass
    assert not server.handshaken


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[i:j] for i, j in itertools.pairwise(points) if j > i]


@settings(
    max_examples=150,
    deadline=None,
)
@given(st.binary(max_size=600), st.lists(st.integers(0, 1000), max_size=5), st.booleans())
def test_any_bytes_to_the_tls_port(server_ctx, data, cuts, end):
    feed_server(server_ctx, split(data, cuts), end)


@settings(
    max_examples=150,
    deadline=None,
)
@given(
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    st.none() | st.integers(0, 600),
    st.binary(max_size=200),
    st.lists(st.integers(0, 1000), max_size=5),
    st.booleans(),
)
def test_a_damaged_client_hello_to_the_tls_port(
    server_ctx, client_hello, flips, cut, tail, cuts, end
):
    data = mutate(client_hello, flips, cut) + tail
    feed_server(server_ctx, split(data, cuts), end)


@settings(
    max_examples=60,
    deadline=None,
)
@given(st.binary(min_size=1, max_size=300), st.lists(st.integers(0, 1000), max_size=5))
def test_any_bytes_after_the_handshake(server_ctx, data, cuts):
    server, _ = connect(server_ctx)
    try:
        for chunk in split(data, cuts):
            assert server.receive(chunk) == b""  # nothing decrypts without the keys
    except ssl.SSLError:
        pass
