"""Servers for the interception tests, run as a child process inside a namespace.

    python -m tests.support.netns_servers --log FILE --ready FILE [--http ADDR:PORT]... [--https ADDR:PORT]...
        [--cert PEM --key PEM] [--https-cert ADDR:PORT PEM KEY]... [--tcp ADDR:PORT]...

``--https`` listeners share ``--cert``/``--key``; ``--https-cert`` names a listener's own pair.

Every HTTP(S) request is answered 200 and logged as one JSON line ``{"listener", "scheme", "host",
"path", "headers", "peer"}``; every TCP connection is logged as ``{"listener", "scheme": "tcp",
"peer"}`` and echoed. Once all sockets listen, ``--ready`` is written.
"""

from __future__ import annotations

import argparse
import json
import socketserver
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_lock = threading.Lock()


def _log(path: Path, entry: dict[str, Any]) -> None:
    with _lock, path.open("a") as out:
        out.write(json.dumps(entry) + "\n")


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _http_handler(log: Path, listener: str, scheme: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            entry = {
                "listener": listener,
                "scheme": scheme,
                "host": self.headers.get("host", ""),
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "peer": self.client_address[0],
            }
            _log(log, entry)
            body = json.dumps({"ok": True, "listener": listener, "scheme": scheme}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = _answer

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler


class _Echo(socketserver.BaseRequestHandler):
    log: Path
    listener: str

    def handle(self) -> None:
        _log(self.log, {"listener": self.listener, "scheme": "tcp", "peer": self.client_address[0]})
        data = self.request.recv(4096)
        if data:
            self.request.sendall(data)


class _TcpServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--log", required=True)
    parser.add_argument("--ready", required=True)
    parser.add_argument("--http", action="append", default=[])
    parser.add_argument("--https", action="append", default=[])
    parser.add_argument("--tcp", action="append", default=[])
    parser.add_argument("--https-cert", action="append", nargs=3, default=[], metavar=("ADDR:PORT", "PEM", "KEY"))
    parser.add_argument("--cert")
    parser.add_argument("--key")
    args = parser.parse_args()
    log = Path(args.log)
    servers: list[socketserver.BaseServer] = []
    for address in args.http:
        servers.append(ThreadingHTTPServer(_split(address), _http_handler(log, f"http {address}", "http")))
    for address, cert, key in [(a, args.cert, args.key) for a in args.https] + args.https_cert:
        server = ThreadingHTTPServer(_split(address), _http_handler(log, f"https {address}", "https"))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        servers.append(server)
    for address in args.tcp:
        handler = type("Echo", (_Echo,), {"log": log, "listener": f"tcp {address}"})
        servers.append(_TcpServer(_split(address), handler))
    for server in servers:
        server.daemon_threads = True  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
    tmp = Path(args.ready + ".tmp")
    tmp.write_text("ready")
    tmp.replace(args.ready)
    threading.Event().wait()


if __name__ == "__main__":
    main()
