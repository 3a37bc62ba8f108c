"""What a hijacked agent tries from inside its container, as one command (run by ``Kubelet.exec``).

    python -m tests.support.boundary_probe ACTION JSON

Prints one JSON document: the outcome of each attempt, as the errno name (``ECONNREFUSED``,
``ENOENT``, ``EACCES``, ``EPERM``, ``ESRCH``; ``timeout`` when nothing answered) or what came back.
Every attempt has a timeout; nothing here raises on a failed attempt - the failure is the result.

Actions:

* ``connect {"targets": [["tcp", host, port] | ["unix", path], ...], "timeout": s}`` - connect to
  each (in parallel): ``connected`` or the errno;
* ``http {"requests": [[method, url, target, body, headers], ...]}`` - one HTTP/1.1 request each to
  ``url``'s host and port (``unix:/path`` URLs go over a Unix socket), for ``target`` (a path, or an
  absolute URL for a proxy), with ``headers`` (a ``Host`` among them is sent as is):
  ``{"status", "headers", "body"}`` or the errno;
* ``grpc {"path": socket}`` - an ext_authz ``Check`` and an SDS ``StreamSecrets`` on the socket:
  the gRPC status code name each;
* ``privileges {"uid": n, "gid": n, "pids": [n, ...], "paths": [p, ...]}`` - ``setuid``/``setgid``
  to the proxy's IDs, an ``AF_PACKET`` socket, a ``mount``, ``kill(pid, 0)`` of the proxy's
  processes, ``os.listdir`` of paths, and this container's view of ``/proc``;
* ``bind {"addresses": [[host, port], ...], "log": file}`` - listen on each (a squatter) and log
  every accepted connection to ``log`` (JSON lines); runs until killed; writes ``log + ".ready"``
  with the outcome of each bind;
* ``unix_server {"path": p, "log": file}`` - create ``p``'s directories, listen on it, log every
  accepted connection; runs until killed; writes ``log + ".ready"`` (``listening`` or the errno);
* ``traffic {"url": u, "host": h, "log": file, "interval": s}`` - GET ``u`` (``Host: h``) in a loop
  (2 s timeout), logging ``{"t", "status" | "error"}`` per call; runs until killed.
"""

from __future__ import annotations

import ctypes
import errno as errno_names
import http.client
import json
import os
import socket
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def _errno(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno_names.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


def _connect(target: list[Any], timeout: float) -> str:
    kind = target[0]
    family = socket.AF_UNIX if kind == "unix" else (socket.AF_INET6 if ":" in str(target[1]) else socket.AF_INET)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(target[1] if kind == "unix" else (target[1], int(target[2])))
        return "connected"
    except OSError as exc:
        return _errno(exc)
    finally:
        sock.close()


class _Unix(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def _http(method: str, url: str, target: str, body: str | None = None, headers: dict[str, str] | None = None) -> Any:
    if url.startswith("unix:"):
        conn: http.client.HTTPConnection = _Unix(url[5:])
    else:
        parts = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=5)
    try:
        conn.request(method, target, body=body.encode() if body is not None else None, headers=headers or {})
        reply = conn.getresponse()
        data = reply.read(65536).decode("utf-8", "replace")
        return {"status": reply.status, "headers": {k.lower(): v for k, v in reply.getheaders()}, "body": data}
    except (OSError, http.client.HTTPException) as exc:
        return _errno(exc)
    finally:
        conn.close()


def _grpc(path: str) -> dict[str, str]:
    import grpc

    out = {}
    with grpc.insecure_channel(f"unix:{path}") as channel:
        check = channel.unary_unary("/envoy.service.auth.v3.Authorization/Check")
        try:
            check(b"", timeout=3)
            out["check"] = "OK"
        except grpc.RpcError as exc:
            out["check"] = exc.code().name  # type: ignore[attr-defined]
        stream = channel.stream_stream("/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets")
        call = stream(iter([b""]), timeout=3)
        try:
            next(call)
            out["sds"] = "OK"
        except grpc.RpcError as exc:
            out["sds"] = exc.code().name  # type: ignore[attr-defined]
        finally:
            call.cancel()  # end the stream before the channel closes (closing with it open may wait)
    return out


def _attempt(call: Any) -> str:
    try:
        call()
        return "ok"
    except OSError as exc:
        return _errno(exc)


def _privileges(args: dict[str, Any]) -> dict[str, Any]:
    libc = ctypes.CDLL(None, use_errno=True)

    def mount() -> None:
        if libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    result: dict[str, Any] = {
        "whoami": [os.getuid(), os.geteuid(), os.getgid()],
        "setuid": _attempt(lambda: os.setuid(args["uid"])),
        "setgid": _attempt(lambda: os.setgid(args["gid"])),
        "setresuid": _attempt(lambda: os.setresuid(args["uid"], args["uid"], args["uid"])),
        "af_packet": _attempt(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close()),
        "raw_ip": _attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP).close()),
        "mount": _attempt(mount),
        "kill": {str(pid): _attempt(lambda p=pid: os.kill(p, 0)) for pid in args.get("pids", [])},
        "listdir": {},
        "proc": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    }
    for path in args.get("paths", []):
        try:
            result["listdir"][path] = sorted(os.listdir(path))
        except OSError as exc:
            result["listdir"][path] = _errno(exc)
    return result


def _ready(log: str, outcome: object) -> None:
    """``log + ".ready"``, written atomically (the test polls for it)."""
    with open(log + ".tmp", "w") as out:
        out.write(json.dumps(outcome))
    os.replace(log + ".tmp", log + ".ready")


def _bind(args: dict[str, Any]) -> None:
    log = args["log"]
    lock = threading.Lock()
    outcome = {}
    sockets = []
    for host, port in args["addresses"]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(64)
            outcome[f"{host}:{port}"] = "listening"
            sockets.append(sock)
        except OSError as exc:
            outcome[f"{host}:{port}"] = _errno(exc)
            sock.close()

    def serve(sock: socket.socket) -> None:
        while True:
            conn, peer = sock.accept()
            with lock, open(log, "a") as out:
                out.write(json.dumps({"local": list(conn.getsockname())[:2], "peer": list(peer)[:2]}) + "\n")
            conn.close()

    for sock in sockets:
        threading.Thread(target=serve, args=(sock,), daemon=True).start()
    _ready(log, outcome)
    while True:
        time.sleep(3600)


def _unix_server(args: dict[str, Any]) -> None:
    path, log = args["path"], args["log"]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        sock.bind(path)
        sock.listen(16)
        outcome = "listening"
    except OSError as exc:
        outcome = _errno(exc)
    _ready(log, outcome)
    while outcome == "listening":
        conn, _ = sock.accept()
        with open(log, "a") as out:
            out.write(json.dumps({"accepted": path}) + "\n")
        conn.close()
    while True:
        time.sleep(3600)


def _traffic(args: dict[str, Any]) -> None:
    parts = urllib.parse.urlsplit(args["url"])
    while True:
        entry: dict[str, Any] = {"t": time.time()}
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=2)
        try:
            conn.request("GET", parts.path, headers={"Host": args["host"]})
            entry["status"] = conn.getresponse().status
        except (OSError, http.client.HTTPException) as exc:
            entry["error"] = _errno(exc)
        finally:
            conn.close()
        with open(args["log"], "a") as out:
            out.write(json.dumps(entry) + "\n")
        time.sleep(args.get("interval", 0.1))


def main() -> None:
    action, args = sys.argv[1], json.loads(sys.argv[2])
    if action == "connect":
        timeout = float(args.get("timeout", 2))
        with ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(lambda t: _connect(t, timeout), args["targets"]))
        print(json.dumps(results))
    elif action == "http":
        with ThreadPoolExecutor(max_workers=8) as pool:
            print(json.dumps(list(pool.map(lambda r: _http(*r), args["requests"]))))
    elif action == "grpc":
        print(json.dumps(_grpc(args["path"])))
    elif action == "privileges":
        print(json.dumps(_privileges(args)))
    elif action == "bind":
        _bind(args)
    elif action == "unix_server":
        _unix_server(args)
    elif action == "traffic":
        _traffic(args)
    else:
        raise SystemExit(f"unknown action {action!r}")


if __name__ == "__main__":
    main()
