"""``agent-authz task``: root task grants and revocation lists for an admin or orchestrator key.

* ``task keygen --out DIR`` - a root issuer key (``issuer.key``) and its JWKS (``issuer.jwks.json``)
  for the ``grants.root_issuers`` of sidecars.
* ``task sign --key issuer.key --task task.yaml [--out FILE]`` - a root grant (compact JWS).
* ``task revoke ID... --key issuer.key --list FILE`` - add ids to a root-signed revocation list;
  ``task revoke ID --admin URL`` asks a running sidecar (``POST /v1/tasks/{id}/revoke``) instead;
  ``task revoke ID... --key issuer.key --authority URL [--ca FILE]`` sends a root-signed list to the
  cluster authority, which stores it and streams it to every sidecar.
* ``task inspect FILE`` - print a grant's chain (decoded, not verified).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sidecar.config.loader import format_loc
from sidecar.config.schema import TaskSpec
from sidecar.errors import ConfigError, KeyLoadError
from sidecar.grants.issue import sign_root_grant
from sidecar.grants.revocations import sign_revocations, verify_revocations
from sidecar.tokens.keys import generate_private_key_pem, load_signing_key

__all__ = ["add_task_commands"]


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    tmp.replace(path)


def _key(path: str) -> Any:
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise KeyLoadError(path, "", f"cannot read: {exc.strerror}") from None
    return load_signing_key(pem, "ES256", file=path, field="--key")


def _keygen(args: argparse.Namespace) -> int:
    out = Path(args.out)
    pem = generate_private_key_pem("ES256")
    key = load_signing_key(pem, "ES256", file="generated", field="")
    _write(out / "issuer.key", pem, 0o600)
    _write(out / "issuer.jwks.json", json.dumps({"keys": [key.public_jwk]}, indent=2).encode())
    print(f"root task issuer key {out / 'issuer.key'} (kid {key.kid}); JWKS {out / 'issuer.jwks.json'}")
    return 0


def _sign(args: argparse.Namespace) -> int:
    key = _key(args.key)
    try:
        data = yaml.safe_load(Path(args.task).read_text())
        spec = TaskSpec.model_validate(data)
    except OSError as exc:
        raise ConfigError(args.task, "", f"cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(args.task, "", f"invalid YAML: {exc}") from None
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise ConfigError(args.task, format_loc(first["loc"]), first["msg"]) from None
    token = sign_root_grant(spec, key.private_key, kid=key.kid, issuer=args.issuer, now=time.time())
    if args.out:
        _write(Path(args.out), token.encode() + b"\n")
        print(f"root grant {spec.id!r} for {spec.agent} -> {args.out}", file=sys.stderr)
    else:
        print(token)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    if args.admin:
        if not args.admin.startswith(("http://", "https://")):
            print("agent-authz task revoke: --admin must be an http(s) URL", file=sys.stderr)
            return 2
        for task_id in args.ids:
            url = f"{args.admin.rstrip('/')}/v1/tasks/{urllib.parse.quote(task_id, safe='/')}/revoke"
            request = urllib.request.Request(url, method="POST", data=b"")  # noqa: S310 - scheme checked above
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            try:
                with opener.open(request, timeout=10) as response:
                    print(json.loads(response.read())["revoked"])
            except urllib.error.HTTPError as err:
                print(f"agent-authz task revoke: {task_id}: {err.read().decode(errors='replace')}", file=sys.stderr)
                return 1
        return 0
    if args.authority:
        return _revoke_at_authority(args)
    if not args.key or not args.list:
        print("agent-authz task revoke: give --key and --list (or --authority), or --admin", file=sys.stderr)
        return 2
    key = _key(args.key)
    path = Path(args.list)
    ids: set[str] = set(args.ids)
    if path.exists():
        current = verify_revocations(
            path.read_text(),
            root_keys={key.kid: key.private_key.public_key()},
            root_ids=frozenset(),
            svids=None,
            now=time.time(),
        )
        ids |= current.ids
    token = sign_revocations(ids, key.private_key, issuer=args.issuer, issued_at=int(time.time()), kid=key.kid)
    _write(path, token.encode() + b"\n")
    print(f"{path}: {len(ids)} revoked ids ({', '.join(sorted(ids))})")
    return 0


def _revoke_at_authority(args: argparse.Namespace) -> int:
    """``POST /v1/revocations`` on the authority's public listener with a list the root key signs."""
    import ssl

    if not args.key or not args.authority.startswith("https://"):
        print("agent-authz task revoke: --authority needs an https:// URL and --key", file=sys.stderr)
        return 2
    key = _key(args.key)
    token = sign_revocations(args.ids, key.private_key, issuer=args.issuer, issued_at=int(time.time()), kid=key.kid)
    context = ssl.create_default_context(cafile=args.ca) if args.ca else ssl.create_default_context()
    request = urllib.request.Request(  # noqa: S310 - https checked above
        f"{args.authority.rstrip('/')}/v1/revocations",
        data=json.dumps({"list": token}).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(request, timeout=10) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as err:
        print(
            f"agent-authz task revoke: the authority answered {err.code}: {err.read().decode(errors='replace')}",
            file=sys.stderr,
        )
        return 1
    except (OSError, ValueError) as exc:
        print(f"agent-authz task revoke: {args.authority}: {exc}", file=sys.stderr)
        return 1
    for task_id in answer.get("accepted", []):
        print(task_id)
    for refusal in answer.get("refused", []):
        print(
            f"agent-authz task revoke: {refusal.get('id')}: {refusal.get('error')}: {refusal.get('detail')}",
            file=sys.stderr,
        )
    print(f"revision {answer.get('revision')}", file=sys.stderr)
    return 1 if answer.get("refused") else 0


def _inspect(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.grant == "-" else Path(args.grant).read_text()
    token: str | None = text.strip()
    depth = 0
    while token:
        try:
            head, body, _ = token.split(".")
            header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
            claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        except ValueError:
            print("agent-authz task inspect: not a compact JWS", file=sys.stderr)
            return 2
        signer = f"kid {header['kid']}" if "kid" in header else f"x5c ({len(header.get('x5c', []))} certs)"
        print(
            f"{'  ' * depth}{claims.get('jti')}  sub={claims.get('sub')}  iss={claims.get('iss')}  signed by {signer}"
        )
        task = claims.get("task", {})
        print(f"{'  ' * depth}  exp={claims.get('exp')} txn={claims.get('txn')} max_calls={task.get('max_calls')}")
        for rule in task.get("egress", []):
            print(
                f"{'  ' * depth}  - {rule.get('methods')} {rule.get('host')} {rule.get('paths')}"
                f" max_calls={rule.get('max_calls')}"
            )
        token = claims.get("parent")
        depth += 1
    print("(decoded, not verified: a sidecar verifies signatures, bundles and attenuation)", file=sys.stderr)
    return 0


def add_task_commands(sub: Any) -> None:
    """Register ``task`` and its subcommands on an argparse subparsers object."""
    task = sub.add_parser("task", help="root task grants and revocations")
    task_sub = task.add_subparsers(dest="task_command", required=True)
    keygen = task_sub.add_parser("keygen", help="create a root task issuer key and its JWKS")
    keygen.add_argument("--out", required=True, help="directory for issuer.key and issuer.jwks.json")
    keygen.set_defaults(func=_keygen)
    sign = task_sub.add_parser("sign", help="sign a task (YAML, the shape of a tasks[] entry) as a root grant")
    sign.add_argument("--key", required=True, help="root issuer private key (EC P-256 PEM)")
    sign.add_argument("--task", required=True, help="task YAML: id, agent, purpose, ttl|expires_at, egress, ...")
    sign.add_argument("--issuer", default="agent-authz-task-issuer", help="the iss claim")
    sign.add_argument("--out", help="write the grant here (default: stdout)")
    sign.set_defaults(func=_sign)
    revoke = task_sub.add_parser("revoke", help="revoke tasks (and everything delegated from them)")
    revoke.add_argument("ids", nargs="+", help="task (grant) ids")
    revoke.add_argument("--key", help="root issuer key signing the list")
    revoke.add_argument("--list", help="the revocation list file to create or extend")
    revoke.add_argument("--issuer", default="agent-authz-task-issuer", help="the iss claim")
    revoke.add_argument("--admin", help="instead: a sidecar's admin URL, e.g. http://127.0.0.1:9902")
    revoke.add_argument(
        "--authority",
        help="instead of --list: the cluster authority's URL (https://<release>-agent-authz-authority.<ns>.svc), "
        "which stores the root-signed list and streams it to every sidecar",
    )
    revoke.add_argument("--ca", help="with --authority: the CA bundle of its certificate (default: the system CAs)")
    revoke.set_defaults(func=_revoke)
    inspect = task_sub.add_parser("inspect", help="print a grant's delegation chain (not verified)")
    inspect.add_argument("grant", help="grant file, or - for stdin")
    inspect.set_defaults(func=_inspect)
