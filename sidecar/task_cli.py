"""``agent-authz task``: root task grants and revocation lists for an admin or orchestrator key.

* ``task keygen --out DIR`` - a root issuer key (``issuer.key``) and its JWKS (``issuer.jwks.json``)
  for the ``grants.root_issuers`` of sidecars.
* ``task sign --key issuer.key --task task.yaml [--out FILE]`` - a root grant (compact JWS).
* ``task revoke ID... --key issuer.key --list FILE`` - add ids to a root-signed revocation list;
  ``task revoke ID --admin URL`` asks a running sidecar (``POST /v1/tasks/{id}/revoke``) instead;
  ``task revoke ID... --key issuer.key --authority URL [--ca FILE]`` sends a root-signed list to the
  cluster authority, which stores it and streams it to every sidecar.
* ``task inspect FILE`` - print a grant's chain (decoded, not verified).
* ``task freeze|unfreeze|kill TARGET... --key issuer.key (--list FILE | --admin URL | --authority URL)``
  - a signed ladder action per target (``agent:<SPIFFE ID>``, ``task:<id>``, ``subtree:<id>``; a bare
  id is a subtree, a bare ``spiffe://`` ID an agent), appended to an actions file sidecars watch
  (``ladder.files``), posted to a sidecar (``POST /v1/control/actions``) and/or to the cluster
  authority, which keeps it and streams it to every sidecar (``POST /v1/actions``).
* ``approve ID [--ttl 10m] --key issuer.key --admin URL`` - approve a call waiting for approval
  (``POST /v1/approvals/{id}``); ``approve --operator-token`` prints a token for the decision
  viewer's approve button instead.

Every document is signed with a root issuer key (``--key``) or an X.509-SVID (``--svid`` and
``--svid-key``: an approver's, or for freezes and kills an agent's own); sidecars verify it.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from pydantic import ValidationError

from sidecar.config.durations import parse_duration
from sidecar.config.loader import format_loc
from sidecar.config.schema import TaskSpec
from sidecar.control.documents import (
    ActionKind,
    ControlError,
    Target,
    sign_action,
    sign_approval,
    sign_operator_token,
)
from sidecar.errors import ConfigError, KeyLoadError
from sidecar.grants.issue import sign_root_grant
from sidecar.grants.revocations import sign_revocations, verify_revocations
from sidecar.tokens.keys import generate_private_key_pem, load_signing_key

__all__ = ["add_approve_command", "add_task_commands"]


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


class _Signer:
    """What ``--key`` or ``--svid``/``--svid-key`` sign with: a root issuer key (``kid``) or an SVID (``x5c``)."""

    def __init__(self, args: argparse.Namespace, command: str) -> None:
        self.kid: str | None = None
        self.x5c: list[x509.Certificate] | None = None
        if args.key and not args.svid:
            key = _key(args.key)
            self.private_key, self.kid, self.issuer = key.private_key, key.kid, args.issuer
        elif args.svid and args.svid_key and not args.key:
            try:
                self.x5c = x509.load_pem_x509_certificates(Path(args.svid).read_bytes())
                self.private_key = load_pem_private_key(Path(args.svid_key).read_bytes(), password=None)
            except (OSError, ValueError) as exc:
                raise KeyLoadError(args.svid, "", f"cannot load the SVID or its key: {exc}") from None
            uris = self.x5c[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            self.issuer = str(uris.get_values_for_type(x509.UniformResourceIdentifier)[0])
        else:
            raise ConfigError(command, "", "give --key (a root issuer key), or --svid and --svid-key")


def _http(
    url: str, data: bytes | None, *, method: str = "POST", headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """One request to a sidecar's admin server (never through a proxy): ``(status, decoded JSON)``."""
    if not url.startswith(("http://", "https://")):
        raise ConfigError("--admin", "", "must be an http(s) URL")
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})  # noqa: S310 - checked
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return int(response.status), json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        body = err.read()
        try:
            return int(err.code), json.loads(body or b"null")
        except ValueError:
            return int(err.code), {"error": "http", "detail": body.decode(errors="replace")}
    except OSError as exc:
        raise ConfigError("--admin", "", f"cannot reach {url}: {exc}") from None


def _append_line(path: Path, line: str) -> None:
    existing = path.read_text() if path.exists() else ""
    if existing and not existing.endswith("\n"):
        existing += "\n"
    _write(path, (existing + line + "\n").encode())


def _post_authority(url: str, ca: str | None, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """``POST`` JSON to the authority's public listener (TLS verified against ``ca`` or the system CAs)."""
    import ssl

    context = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
    request = urllib.request.Request(  # noqa: S310 - https checked by the caller
        f"{url.rstrip('/')}{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(request, timeout=10) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return int(err.code), json.loads(raw)
        except ValueError:
            return int(err.code), {"error": "http", "detail": raw.decode(errors="replace")}
    except (OSError, ValueError) as exc:
        raise ConfigError("--authority", "", f"cannot reach {url}: {exc}") from None


def _ladder(args: argparse.Namespace) -> int:
    command = f"agent-authz task {args.task_command}"
    if not args.list and not args.admin and not args.authority:
        print(f"{command}: give --list FILE, --admin URL and/or --authority URL", file=sys.stderr)
        return 2
    if args.authority and not args.authority.startswith("https://"):
        print(f"{command}: --authority needs an https:// URL", file=sys.stderr)
        return 2
    try:
        targets = [Target.parse(text) for text in args.targets]
    except ControlError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 2
    signer = _Signer(args, command)
    kind = ActionKind(args.task_command)
    tokens = [
        sign_action(
            kind,
            target,
            signer.private_key,
            issuer=signer.issuer,
            at=time.time(),
            reason=args.reason or "",
            kid=signer.kid,
            x5c=signer.x5c,
        )
        for target in targets
    ]
    if args.list:
        path = Path(args.list)
        for token in tokens:
            _append_line(path, token)
        print(f"{path}: {kind} {', '.join(map(str, targets))} (signed by {signer.issuer})")
    for admin in args.admin or ():
        status, body = _http(f"{admin.rstrip('/')}/v1/control/actions", "\n".join(tokens).encode())
        if status != 200:
            print(f"{command}: {admin}: {status} {body.get('error')}: {body.get('detail')}", file=sys.stderr)
            return 1
        print(f"{admin}: {kind} {', '.join(map(str, targets))}: applied {len(body['applied'])}, known {body['known']}")
    if args.authority:
        status, body = _post_authority(args.authority, args.ca, "/v1/actions", {"actions": tokens})
        for refusal in body.get("refused", []) if isinstance(body, dict) else []:
            print(f"{command}: the authority refused: {refusal.get('error')}: {refusal.get('detail')}", file=sys.stderr)
        if status != 200:
            print(f"{command}: the authority answered {status}: {body}", file=sys.stderr)
            return 1
        print(f"{args.authority}: {kind} {', '.join(map(str, targets))}: kept at revision {body.get('revision')}")
    return 0


def _agent_of(admin: str) -> str:
    status, body = _http(f"{admin.rstrip('/')}/readyz", None, method="GET")
    if not isinstance(body, dict) or not isinstance(body.get("agent"), str):
        raise ConfigError("--admin", "", f"{admin}/readyz did not name the agent (HTTP {status}); give --for")
    return str(body["agent"])


def _approve(args: argparse.Namespace) -> int:
    signer = _Signer(args, "agent-authz approve")
    if args.operator_token:
        if not args.for_agent and not args.admin:
            print("agent-authz approve --operator-token: give --for SPIFFE_ID or --admin URL", file=sys.stderr)
            return 2
        audience = args.for_agent or _agent_of(args.admin)
        lifetime = args.ttl if args.ttl is not None else 3600.0
        token = sign_operator_token(
            signer.private_key,
            issuer=signer.issuer,
            audience=audience,
            now=time.time(),
            lifetime=lifetime,
            kid=signer.kid,
            x5c=signer.x5c,
        )
        print(token)
        if args.admin:
            print(f"viewer: {args.admin.rstrip('/')}/decisions#operator={token}", file=sys.stderr)
        return 0
    if not args.approval_id or not args.admin:
        print("agent-authz approve: give the approval ID and --admin URL (or --operator-token)", file=sys.stderr)
        return 2
    audience = args.for_agent or _agent_of(args.admin)
    token = sign_approval(
        args.approval_id,
        signer.private_key,
        issuer=signer.issuer,
        audience=audience,
        ttl=args.ttl,
        now=time.time(),
        kid=signer.kid,
        x5c=signer.x5c,
    )
    status, body = _http(
        f"{args.admin.rstrip('/')}/v1/approvals/{urllib.parse.quote(args.approval_id)}", token.encode()
    )
    if status != 200:
        print(
            f"agent-authz approve: {args.approval_id}: {status} {body.get('error')}: {body.get('detail')}",
            file=sys.stderr,
        )
        return 1
    call = body.get("call", {})
    until = datetime.fromtimestamp(float(body["expires_at"]), UTC).isoformat(timespec="seconds")
    print(
        f"approved {body['id']} ({call.get('method')} {call.get('host')}{call.get('path')}"
        f"{' tool ' + call['tool'] if call.get('tool') else ''}) until {until}: one retry"
    )
    return 0


def _signing_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", help="root issuer private key (EC P-256 PEM; agent-authz task keygen)")
    parser.add_argument("--svid", help="instead: sign with this X.509-SVID (PEM chain, leaf first)")
    parser.add_argument("--svid-key", help="the SVID's private key (PEM)")
    parser.add_argument("--issuer", default="agent-authz-task-issuer", help="the iss claim (with --key)")


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_approve_command(sub: Any) -> None:
    """Register ``approve`` on an argparse subparsers object."""
    approve = sub.add_parser(
        "approve",
        help="approve a call waiting for a human approval (or print an operator token for the viewer)",
        description="Approve the call APPROVAL_ID (from a 403 approval_required answer or its decision record): the "
        "agent's retry of exactly that call is allowed once, within --ttl. Signed with a root issuer key or an "
        "approver's X.509-SVID (approvals.approvers) and posted to the sidecar's admin URL. With --operator-token, "
        "print a token (valid --ttl, default 1h, at most 12h) that lets the decision viewer's approve button act.",
    )
    approve.add_argument("approval_id", nargs="?", help="the approval id")
    approve.add_argument("--ttl", type=_duration, help="how long the approval (or operator token) stays usable")
    approve.add_argument("--admin", help="the sidecar's admin URL, e.g. http://127.0.0.1:9902")
    approve.add_argument("--for", dest="for_agent", help="the sidecar's agent SPIFFE ID (default: asked from --admin)")
    approve.add_argument("--operator-token", action="store_true", help="print an operator token for the viewer")
    _signing_options(approve)
    approve.set_defaults(func=_approve)


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
    helps = {
        "freeze": "freeze tasks: every call denied task_quarantined until unfrozen",
        "unfreeze": "lift freezes (a root issuer key only)",
        "kill": "revoke tasks and everything below them for good, and refuse new grants under them",
    }
    for kind, text in helps.items():
        step = task_sub.add_parser(
            kind, help=text, description=f"{text[0].upper()}{text[1:]}: a signed action per target."
        )
        step.add_argument("targets", nargs="+", help="agent:<SPIFFE ID>, task:<id>, subtree:<id> (a bare id: subtree)")
        _signing_options(step)
        step.add_argument("--list", help="append the signed actions to this file (a sidecar's ladder.files)")
        step.add_argument("--admin", action="append", help="post them to this sidecar's admin URL (repeatable)")
        step.add_argument(
            "--authority", help="post them to the cluster authority (https://...): it streams them to every sidecar"
        )
        step.add_argument("--ca", help="with --authority: the CA bundle of its certificate (default: the system CAs)")
        step.add_argument("--reason", help="why (recorded with the action)")
        step.set_defaults(func=_ladder)
