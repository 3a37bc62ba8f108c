"""Which names the agent may resolve: its active tasks' hosts and dns.allow, nothing else."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.config.schema import TaskSpec
from sidecar.decision import Protocol, Reason
from sidecar.policy.compile import TaskSource, compile_policy
from sidecar.policy.names import NameList, decide_name
from tests.support.config import AGENT, task

PLAIN = {"methods": ["GET"], "paths": ["*"]}
TASKS = [
    task("t1", egress=[{"host": "api.example.com", **PLAIN}, {"host": "*.files.example.com", "tls": "passthrough"}]),
    task("old", egress=[{"host": "old.example.com", **PLAIN}], ttl=None, expires_at="2001-01-01T00:00:00Z"),
]
POLICY = compile_policy([TaskSource(TaskSpec.model_validate(t)) for t in TASKS], lambda _: 1_800_000_000.0, AGENT)
ALLOW = NameList.compile(["*.cluster.local", "metadata.internal"])


def _decide(name: str, qtype: str = "A") -> tuple[bool, Reason, str, str | None]:
    d = decide_name(POLICY, ALLOW, name, qtype, now=1_800_000_000, decision_id="d")
    assert d.protocol is Protocol.DNS and d.http_status == 0 and d.agent == AGENT and d.qtype == qtype
    return d.allow, d.reason, d.host, d.rule


@pytest.mark.parametrize(
    ("name", "allowed", "host"),
    [
        ("api.example.com", True, "api.example.com"),
        ("API.Example.COM", True, "api.example.com"),
        ("api.example.com.", True, "api.example.com"),
        ("a.b.files.example.com", True, "a.b.files.example.com"),
        ("files.example.com", False, "files.example.com"),
        ("kubernetes.default.svc.cluster.local", True, "kubernetes.default.svc.cluster.local"),
        ("metadata.internal", True, "metadata.internal"),
        ("cluster.local", False, "cluster.local"),
        ("old.example.com", False, "old.example.com"),  # its task expired
        ("api.example.com.attacker.test", False, "api.example.com.attacker.test"),
        ("api.example.com:80", False, "api.example.com:80"),  # not a host name: never stripped to one
        ("api\\000.example.com", False, "api\\000.example.com"),
        ("", False, ""),
        ("_dmarc.api.example.com", False, "_dmarc.api.example.com"),
    ],
)
def test_names(name: str, allowed: bool, host: str) -> None:
    ok, reason, seen, _ = _decide(name)
    assert (ok, reason, seen) == (allowed, Reason.ALLOWED if allowed else Reason.DNS_NOT_ALLOWED, host)


def test_the_rule_or_the_allow_list_is_named() -> None:
    assert _decide("api.example.com")[3] == "egress[0]"
    assert _decide("x.svc.cluster.local")[3] == "dns.allow"


@given(st.from_regex(r"[a-z0-9]{1,20}(\.[a-z0-9]{1,20}){0,4}", fullmatch=True))
def test_a_name_is_allowed_exactly_when_a_rule_or_the_list_covers_it(label: str) -> None:
    for name in (label, f"{label}.files.example.com", f"{label}.cluster.local", f"{label}.example.net"):
        expected = name.endswith((".files.example.com", ".cluster.local")) or name in (
            "api.example.com",
            "metadata.internal",
        )
        assert _decide(name)[0] is expected, name
