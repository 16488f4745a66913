"""``qless-pool web``: serve the dashboard with waitress (a production WSGI server, threaded,
pure Python); ``qless-pool web hash-token``: the token file's line for a token.

    qless-pool web [-R URL] [--host H] [--port P] [--prefix /path] [--token-file FILE]
                   [--read-only] [--hide-data-keys K,K] [--behind-proxy] [--threads N]
    qless-pool web hash-token --scope read|write  < token

Exit status: 0, 2 for bad usage (or a setting that would expose the dashboard: a non-loopback
address without a token file and not --read-only).
"""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import logging
import sys
from collections.abc import Sequence
from typing import Any

from ..urls import check_redis_url, mask_argument, redis_url_and_origin

__all__ = ["DEFAULT_PORT", "main"]

DEFAULT_PORT = 5151
EX_USAGE = 2


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(
        prog="qless-pool web",
        description="Serve the web dashboard: queues, jobs, failed jobs, workers and pools. "
        "'qless-pool web hash-token --scope read|write' makes a token file's line.",
    )
    parse.add_argument(
        "-R",
        "--redis",
        metavar="URL",
        help="qless's Redis (default: $QLESS_URL, $REDIS_URL, localhost)",
    )
    parse.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)"
    )
    parse.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help=f"the port (default {DEFAULT_PORT})"
    )
    parse.add_argument(
        "--prefix",
        default="",
        type=_prefix,
        help="serve under this path (/qless), e.g. behind a reverse proxy",
    )
    parse.add_argument(
        "--token-file",
        metavar="FILE",
        help="the tokens let in ('<read|write> <hash> [name]' a line); without "
        "one, anyone who reaches the server may look (and act, unless "
        "--read-only), so it listens on loopback only",
    )
    parse.add_argument("--read-only", action="store_true", help="refuse every action")
    parse.add_argument(
        "--hide-data-keys",
        metavar="K,K",
        type=_keys,
        help="also hide job data under keys whose name contains one of these (always "
        "hidden: password, secret, token, api_key, credential, ...)",
    )
    parse.add_argument(
        "--behind-proxy",
        action="store_true",
        help="trust one proxy's X-Forwarded-For and X-Forwarded-Proto headers (the proxy "
        "passes the Host header; the path prefix is --prefix)",
    )
    parse.add_argument(
        "--threads", type=_threads, default=8, help="requests served at once (default 8)"
    )
    return parse


def hash_parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(
        prog="qless-pool web hash-token",
        description="Read a token on stdin; print its line for the token file: <scope> <hash>. "
        "Add a name after it for the log.",
    )
    parse.add_argument("--scope", choices=("read", "write"), required=True)
    return parse


def main(argv: Sequence[str]) -> int:
    if list(argv[:1]) == ["hash-token"]:
        return hash_token_command(argv[1:])
    args = parser().parse_args(argv)
    try:
        from .app import create_app
    except ImportError as error:  # the core install has no Flask
        return _fail(f"the web dashboard needs the web extra: pip install 'qless-pool[web]' "
                     f"({error})")  # fmt: skip
    url, origin = redis_url_and_origin(args.redis)
    try:
        check_redis_url(url)
    except ValueError as error:
        return _fail(f"bad Redis URL (from {origin}): {error}")
    if not args.token_file and not args.read_only and not _loopback(args.host):
        return _fail(
            f"--host {args.host} is not a loopback address: give --token-file (so that only "
            "those with a token get in) or --read-only"
        )
    _configure_logging()
    from .tokens import TokenError

    # Without a token file the app answers loopback Host names only (DNS rebinding); a
    # read-only dashboard its operator put on the network answers every name.
    exposed = args.read_only and (args.behind_proxy or not _loopback(args.host))
    try:
        app: Any = create_app(
            url, token_file=args.token_file, read_only=args.read_only,
            hide_data_keys=args.hide_data_keys or (),
            hosts=["*"] if exposed and not args.token_file else None,
        )  # fmt: skip
    except TokenError as error:
        return _fail(str(error))
    if args.behind_proxy:
        from werkzeug.middleware.proxy_fix import ProxyFix

        app = ProxyFix(app, x_for=1, x_proto=1, x_host=0, x_prefix=0)
    if args.prefix:  # the dashboard under its prefix, 404 outside it
        from werkzeug.exceptions import NotFound
        from werkzeug.middleware.dispatcher import DispatcherMiddleware

        app = DispatcherMiddleware(NotFound(), {args.prefix: app})
    return serve(app, args, mask_argument(url))


def serve(app: Any, args: argparse.Namespace, shown: str) -> int:
    import waitress

    host = f"[{args.host}]" if ":" in args.host else args.host
    log = logging.getLogger("qless_pool.web")
    log.info(
        "serving the dashboard on http://%s:%d%s/ (Redis %s%s%s)", host, args.port, args.prefix,
        shown, ", read-only" if args.read_only else "",
        ", tokens from " + args.token_file if args.token_file else ", no token file",
    )  # fmt: skip
    if args.token_file and not _loopback(args.host) and not args.behind_proxy:
        log.warning("tokens cross the network in clear over plain HTTP: put TLS in front "
                    "(a reverse proxy, then --behind-proxy)")  # fmt: skip
    waitress.serve(
        app, host=args.host, port=args.port, threads=args.threads, ident="qless-pool", clear_untrusted_proxy_headers=not args.behind_proxy,
    )  # fmt: skip
    return 0


def hash_token_command(argv: Sequence[str]) -> int:
    args = hash_parser().parse_args(argv)
    from .tokens import TokenError, hash_token

    token = getpass.getpass("token: ") if sys.stdin.isatty() else sys.stdin.readline()
    try:
        print(hash_token(token, args.scope))
    except TokenError as error:
        return _fail(str(error))
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _configure_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("qless_pool.web", "waitress"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _port(text: str) -> int:
    number = _int(text, "port")
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port {number}: from 1 to 65535")
    return number


def _threads(text: str) -> int:
    number = _int(text, "threads")
    if not 1 <= number <= 256:
        raise argparse.ArgumentTypeError(f"threads {number}: from 1 to 256")
    return number


def _int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} {text!r}: a whole number") from None


def _prefix(text: str) -> str:
    text = text.strip()
    if not text or text == "/":
        return ""
    if not text.startswith("/") or "//" in text or any(c in text for c in "?#\\ "):
        raise argparse.ArgumentTypeError(f"prefix {text!r}: a path such as /qless")
    return text.rstrip("/")


def _keys(text: str) -> list[str]:
    return [key.strip() for key in text.split(",") if key.strip()]


def _fail(message: str, status: int = EX_USAGE) -> int:
    print(f"qless-pool web: {message}", file=sys.stderr)
    return status
