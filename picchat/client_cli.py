"""The command lines of picchat-send and picchat-client (argparse), and their exit codes.

The server's own command line is in ``cli``, without argparse (start-up memory).
"""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .exits import EX_DATAERR, EX_OK, EX_USAGE

TYPE_CHECKING = False  # typing is not imported at run time: start-up time
if TYPE_CHECKING:
    from typing import Any, NoReturn

    from .credentials import Credentials


def _help_formatter(prog: str) -> argparse.HelpFormatter:
    # argparse makes a formatter for every add_argument(); left to find the
    # width itself it imports shutil, which loads bz2 and lzma: half a
    # megabyte of a daemon that never shows its help.
    try:
        width = int(os.environ.get("COLUMNS", "")) - 2
    except ValueError:
        try:
            width = os.get_terminal_size(sys.stderr.fileno()).columns - 2
        except (OSError, ValueError):
            width = 78
    return argparse.HelpFormatter(prog, width=max(width, 40))


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error exits 64 (EX_USAGE), not 2."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(formatter_class=_help_formatter, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def add_target_options(p: Parser) -> None:
    """Where the server is: the same options, and the same rule, for every client."""
    p.add_argument(
        "--socket",
        metavar="PATH",
        help="the server's Unix socket (default: the server's default path if it exists, "
        "then /run/picchat/picchat.sock)",
    )
    p.add_argument("--host", help="server host (forces TCP; default 127.0.0.1)")
    p.add_argument(
        "--port", type=port, help="server TCP port (forces TCP; default 1234, with TLS 1235)"
    )
    p.add_argument(
        "--token-file",
        metavar="PATH",
        help="file holding the token for a server on another machine, readable only by you "
        "(env: PICCHAT_TOKEN holds the token itself)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS (forces TCP); the server's certificate is checked by "
        "--ca-file, or --fingerprint, or else trusted on first use and remembered in "
        "~/.config/picchat/known_hosts",
    )
    p.add_argument(
        "--fingerprint",
        metavar="SHA256:...",
        help="accept only the server certificate with this fingerprint (implies --tls; "
        "`picchat-server --print-fingerprint` prints it)",
    )
    p.add_argument(
        "--ca-file",
        metavar="PATH",
        help="verify the server's certificate with this CA (implies --tls)",
    )


def credentials(prog: str, args: argparse.Namespace) -> Credentials:
    """The token and TLS trust from the options; exits 64 with the reason."""
    from .credentials import from_options

    try:
        return from_options(args.token_file, args.tls, args.ca_file, args.fingerprint)
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(EX_USAGE) from None


def port(text: str) -> int:
    """A TCP port number, 1 to 65535 (argparse names it in errors: "invalid port value")."""
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(text)
    return port


def send_parser() -> Parser:
    p = Parser(
        prog="picchat-send",
        description="Send a message to a picchat server and wait until it is accepted. "
        "By default it uses the server's local socket if that exists, else TCP "
        "127.0.0.1:1234.",
        epilog="Exit codes: 0 every message accepted, 64 usage error, 65 a message was "
        "refused, 69 no server reachable, 75 timed out, 76 protocol error or the server's "
        "certificate is not the expected one, 77 the local socket exists but we may not use "
        "it, or the server needs a token or refused ours.",
    )
    p.add_argument("message", help="the message; '-' sends each line of standard input")
    add_target_options(p)
    p.add_argument("--name", help="sender name shown to others (default: user@host)")
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="if no server is reachable, retry every 5 s for up to SECONDS (default: 0)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="give up if the server has not answered for SECONDS (default: 10)",
    )
    p.add_argument("--version", action="version", version=f"picchat {__version__}")
    return p


def send_main(argv: list[str] | None = None) -> int:
    from .send import SendError, send

    args = send_parser().parse_args(argv)
    if args.message != "-" and not args.message.strip():
        print("picchat-send: the message is empty; nothing sent", file=sys.stderr)
        return EX_USAGE
    if not args.timeout > 0 or not args.wait >= 0:
        print("picchat-send: --timeout must be above 0 and --wait not below 0", file=sys.stderr)
        return EX_USAGE
    try:
        count = send(
            args.message,
            socket_path=args.socket,
            host=args.host,
            port=args.port,
            name=args.name,
            wait=args.wait,
            timeout=args.timeout,
            creds=credentials("picchat-send", args),
        )
    except SendError as exc:
        print(f"picchat-send: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return EX_OK if count == 0 else EX_DATAERR


def client_parser() -> Parser:
    p = Parser(
        prog="picchat-client",
        description="Chat interactively through a picchat server. It reconnects by itself "
        "and shows every message missed meanwhile; lines typed while disconnected are sent "
        "on reconnection. By default it uses the server's local socket if that exists, "
        "else TCP 127.0.0.1:1234.",
        epilog="Keys: Enter sends, Backspace, Ctrl-U clears the line, Ctrl-W deletes a word, "
        "Ctrl-C drops the line (on an empty line: quits), Ctrl-D on an empty line quits. "
        "Exit codes: 0 quit, 64 usage error, 69 no such socket, 76 protocol error or the "
        "server's certificate is not the expected one, 77 the local socket exists but we may "
        "not use it, or the server needs a token or refused ours.",
    )
    add_target_options(p)
    p.add_argument("--name", help="the name to chat under (default: a guest name)")
    p.add_argument(
        "--retry",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="seconds between reconnection attempts, +-10%% (default: 5)",
    )
    p.add_argument(
        "--max-pending",
        type=int,
        default=100,
        metavar="N",
        help="messages kept while disconnected or unacknowledged (default: 100)",
    )
    p.add_argument("--version", action="version", version=f"picchat {__version__}")
    return p


def client_main(argv: list[str] | None = None) -> int:
    from .client import run_client

    args = client_parser().parse_args(argv)
    if args.retry <= 0 or args.max_pending < 1:
        print("picchat-client: --retry and --max-pending must be positive", file=sys.stderr)
        return EX_USAGE
    try:
        return run_client(
            args.socket,
            args.host,
            args.port,
            args.name,
            args.retry,
            args.max_pending,
            credentials("picchat-client", args),
        )
    except KeyboardInterrupt:
        return 130
