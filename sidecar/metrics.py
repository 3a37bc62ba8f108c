"""Prometheus metrics of one sidecar process, on a dedicated :class:`~prometheus_client.CollectorRegistry`.

The request path touches only pre-resolved counter and histogram children (:meth:`Metrics.observe`).
Everything else is read from the runtime and the decision log when ``/metrics`` is scraped, so it
costs nothing per request.

Every metric is named, typed and described where it is created below (name, help string, labels):
``docs/reference/metrics.md`` is generated from these calls by ``scripts/gen_docs.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar.decision import Decision, Reason
from sidecar.errors import ErrorCode
from sidecar.policy.model import SENSITIVITY_NAMES

if TYPE_CHECKING:
    from sidecar.audit.log import DecisionLog
    from sidecar.runtime.active import Runtime

__all__ = [
    "CONTENT_TYPE",
    "DNS_OUTCOMES",
    "LATENCY_BUCKETS",
    "MAX_TASK_LABELS",
    "RELOAD_FAILURE_CODES",
    "AuthorityMetrics",
    "AuthorityState",
    "Metrics",
    "WebhookMetrics",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST
DNS_OUTCOMES = ("allowed", "refused", "malformed", "upstream_failed", "overloaded")
"""The ``outcome`` values of ``agent_authz_dns_queries`` (each has a sample from the start)."""
MAX_TASK_LABELS = 50
"""At most this many ``task`` label values on ``agent_authz_task_budget_remaining`` (fewest calls left first)."""
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
"""Seconds; Envoy's default ext_authz timeout is 250 ms."""
RELOAD_FAILURE_CODES = (ErrorCode.CONFIG_INVALID, ErrorCode.KEY_INVALID, ErrorCode.IDENTITY_INVALID)
"""The codes a reload can fail with (:class:`~sidecar.errors.ConfigError`, its
:class:`~sidecar.errors.KeyLoadError` and :class:`~sidecar.identity.state.IdentityLoadError`); each
has a sample from the start, zero until it happens."""


class Metrics:
    """The metrics of one process.

    Attributes:
        registry: the process's own registry (never the global one).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._decisions = Counter(
            "agent_authz_decisions",
            "Authorization decisions answered to Envoy, and the refusals Envoy reported (refused_by_proxy).",
            ["direction", "decision", "reason"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "agent_authz_decision_duration_seconds",
            "Time to handle one Check, decision log write (and fsync) included.",
            ["reason"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._would_deny = Counter(
            "agent_authz_dry_run_would_deny",
            "Calls dry-run mode let through that the policy denies.",
            ["direction", "reason"],
            registry=self.registry,
        )
        dns_queries = Counter(
            "agent_authz_dns_queries",
            "Queries the DNS proxy received, by outcome: allowed (forwarded), refused (dns_not_allowed, each "
            "recorded), malformed (not a DNS query: dropped), upstream_failed (SERVFAIL), overloaded (dropped).",
            ["outcome"],
            registry=self.registry,
        )
        self._dns = {outcome: dns_queries.labels(outcome) for outcome in DNS_OUTCOMES}
        self._by_sensitivity = Counter(
            "agent_authz_decisions_by_sensitivity",
            "Egress decisions by the sensitivity label of what the call reaches (calls no rule names are not counted).",
            ["sensitivity", "decision"],
            registry=self.registry,
        )
        self._control = Counter(
            "agent_authz_control_records",
            "Control records written: task_frozen (a quarantine or a signed freeze), would_quarantine, "
            "task_unfrozen, task_killed, approval_granted, not_authorized (a refused action or approval).",
            ["reason"],
            registry=self.registry,
        )
        self._children: dict[
            tuple[str, bool, Reason, Reason | None, str | None],
            tuple[Counter, Histogram, Counter | None, Counter | None],
        ] = {}

    def observe(self, decision: Decision, seconds: float) -> None:
        """Count one answered decision and its handling time (``seconds``)."""
        key = (decision.direction.value, decision.allow, decision.reason, decision.would_reason, decision.sensitivity)
        children = self._children.get(key)
        if children is None:
            would = decision.would_reason if decision.dry_run and decision.would_reason is not Reason.ALLOWED else None
            verdict = "allow" if decision.allow else "deny"
            label = decision.sensitivity
            children = (
                self._decisions.labels(key[0], verdict, decision.reason.value),
                self._latency.labels(decision.reason.value),
                self._would_deny.labels(key[0], would.value) if would is not None else None,
                self._by_sensitivity.labels(label, verdict) if label is not None else None,
            )
            self._children[key] = children
        counter, histogram, would_deny, sensitivity = children
        counter.inc()
        histogram.observe(seconds)
        if would_deny is not None:
            would_deny.inc()
        if sensitivity is not None:
            sensitivity.inc()

    def observe_control(self, decision: Decision) -> None:
        """Count one control record (a quarantine, an operator's action or approval)."""
        self._control.labels(decision.reason.value).inc()

    def dns_query(self, outcome: str) -> None:
        """Count one DNS query under ``outcome`` (one of :data:`DNS_OUTCOMES`)."""
        self._dns[outcome].inc()

    def count(self, decision: Decision) -> None:
        """Count one decision that answered nobody (a refusal Envoy reported after the fact): the
        decisions counter only, no handling time."""
        self._decisions.labels(
            decision.direction.value, "allow" if decision.allow else "deny", decision.reason.value
        ).inc()

    def bind(self, runtime: Runtime, decision_log: DecisionLog) -> None:
        """Expose the state of ``runtime`` and ``decision_log`` at scrape time."""
        self.registry.register(_StateCollector(runtime, decision_log))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(self, runtime: Runtime, decision_log: DecisionLog) -> None:
        self._runtime = runtime
        self._log = decision_log

    def collect(self) -> Iterator[Metric]:
        runtime, log = self._runtime, self._log
        yield CounterMetricFamily(
            "agent_authz_tokens_minted",
            "Tokens signed (request path and background refreshes).",
            value=runtime.tokens.minted,
        )
        yield CounterMetricFamily(
            "agent_authz_tokens_served_from_cache", "Tokens reused from the cache.", value=runtime.tokens.hits
        )
        remaining = GaugeMetricFamily(
            "agent_authz_task_budget_remaining",
            f"Calls left under the task's max_calls (at most {MAX_TASK_LABELS} tasks, fewest left first).",
            labels=["task"],
        )
        budgets = [
            (task.max_calls - runtime.budgets.used((task.id, "")), task.id)
            for task in runtime.snapshot.policy.tasks_by_id.values()
            if task.max_calls is not None
        ]
        budgets.sort()
        for left, task_id in budgets[:MAX_TASK_LABELS]:
            remaining.add_metric([task_id], max(0, left))
        yield remaining
        yield GaugeMetricFamily(
            "agent_authz_task_budget_series_dropped",
            f"Tasks with a budget not exported (more than {MAX_TASK_LABELS}).",
            value=max(0, len(budgets) - MAX_TASK_LABELS),
        )
        yield CounterMetricFamily(
            "agent_authz_config_reloads", "Configurations swapped in (reloads applied).", value=runtime.reloads
        )
        failures = CounterMetricFamily(
            "agent_authz_config_reload_failures",
            "Reloads rejected (the last good configuration stays), by error code.",
            labels=["code"],
        )
        by_code = runtime.reload_failures_by_code
        for code in sorted({*RELOAD_FAILURE_CODES, *by_code}):
            failures.add_metric([code], by_code.get(code, 0))
        yield failures
        errors = CounterMetricFamily(
            "agent_authz_decision_log_write_errors", "Failed decision log writes or fsyncs, by sink.", labels=["sink"]
        )
        for sink, count in log.write_errors.items():
            errors.add_metric([sink], count)
        yield errors
        expiry = GaugeMetricFamily(
            "agent_authz_svid_expiry_timestamp_seconds",
            "Expiry of the agent's X.509-SVID, POSIX seconds (absent without an identity source); "
            "the serial label changes on rotation.",
            labels=["spiffe_id", "serial"],
        )
        identity = runtime.snapshot.identity
        if identity is not None:
            svid = identity.state.svid
            expiry.add_metric([svid.spiffe_id, svid.serial], svid.not_after)
        yield expiry
        rejected = CounterMetricFamily(
            "agent_authz_identity_updates_rejected",
            "Identity updates refused (files or Workload API), by source and sub-code (svid_*, bundle_*, "
            "identity_file_unreadable); the previous identity stays active.",
            labels=["source", "detail"],
        )
        for (source, detail), count in sorted(runtime.identity_rejections.items()):
            rejected.add_metric([source, detail], count)
        yield rejected
        yield GaugeMetricFamily(
            "agent_authz_decision_log_healthy", "1 when the last log write succeeded.", value=int(log.healthy)
        )
        yield GaugeMetricFamily(
            "agent_authz_decision_log_seq",
            "seq of the last record written (the head for logs verify --expect).",
            value=log.head.seq,
        )
        yield CounterMetricFamily(
            "agent_authz_decision_log_rotations", "Decision log files rotated by this process.", value=log.rotations
        )
        yield GaugeMetricFamily(
            "agent_authz_dry_run", "1 in dry-run mode.", value=int(runtime.snapshot.loaded.settings.dry_run)
        )
        yield from self._continuous(runtime)
        feed = runtime.feed
        if isinstance(feed, FeedView):
            yield from _feed_metrics(feed, runtime.clock())

    @staticmethod
    def _continuous(runtime: Runtime) -> Iterator[Metric]:
        quarantines = CounterMetricFamily(
            "agent_authz_quarantines",
            "Times the anomaly rule tripped, by mode: freeze (the task's subtree frozen) or dry_run "
            "(would_quarantine recorded).",
            labels=["mode"],
        )
        for mode in ("freeze", "dry_run"):
            quarantines.add_metric([mode], runtime.quarantines.get(mode, 0))
        yield quarantines
        blocked = GaugeMetricFamily(
            "agent_authz_blocked_tasks",
            "Tasks held here that the freeze ladder blocks now, by reason: task_quarantined (frozen) or "
            "task_revoked (killed).",
            labels=["reason"],
        )
        reasons = [reason for reason, _ in runtime.blocks.values()]
        for reason in (Reason.TASK_QUARANTINED, Reason.TASK_REVOKED):
            blocked.add_metric([reason.value], reasons.count(reason))
        yield blocked
        approvals = GaugeMetricFamily(
            "agent_authz_approvals",
            "Approvals known here, by status (pending: waiting for a human).",
            labels=["status"],
        )
        statuses = [approval.state.value for approval in runtime.approvals.all()]
        for status in ("pending", "approved", "consumed", "expired", "stale"):
            approvals.add_metric([status], statuses.count(status))
        yield approvals
        info = GaugeMetricFamily(
            "agent_authz_task_info",
            f"1 per task held here with its purpose (cut to 128 characters) and max_sensitivity (at most "
            f"{MAX_TASK_LABELS} tasks).",
            labels=["task", "purpose", "max_sensitivity"],
        )
        tasks = sorted(runtime.snapshot.policy.tasks_by_id.values(), key=lambda t: t.id)
        for task in tasks[:MAX_TASK_LABELS]:
            limit = "" if task.max_sensitivity is None else SENSITIVITY_NAMES[task.max_sensitivity]
            info.add_metric([task.id, task.purpose[:128], limit], 1)
        yield info


@runtime_checkable
class FeedView(Protocol):
    """What the metrics read of the revocation feed (:class:`sidecar.authority.client.FeedStatus`)."""

    connected: bool
    started_at: float
    last_contact: float | None
    last_lag: float | None
    last_reconnect: float | None
    reconnects: int
    entries: int
    forwarded: int
    forward_failures: int
    events: dict[str, int]

    def stale(self, now: float) -> bool:
        """Whether the feed is stale at ``now``."""
        ...


def _feed_metrics(feed: FeedView, now: float) -> Iterator[Metric]:
    """The revocation feed's state (``grants.revocation_feed``)."""
    yield GaugeMetricFamily(
        "agent_authz_revocation_feed_connected",
        "1 while the stream to the cluster authority is open and has delivered its snapshot.",
        value=int(feed.connected),
    )
    yield GaugeMetricFamily(
        "agent_authz_revocation_feed_stale",
        "1 while the feed has been unreachable for longer than max_staleness (tasks are denied revocation_feed_stale).",
        value=int(feed.stale(now)),
    )
    reference = feed.last_contact if feed.last_contact is not None else feed.started_at
    yield GaugeMetricFamily(
        "agent_authz_revocation_feed_last_contact_age_seconds",
        "Seconds since the last feed event (heartbeats included), or since start before the first.",
        value=max(0.0, now - reference),
    )
    if feed.last_lag is not None:
        yield GaugeMetricFamily(
            "agent_authz_revocation_feed_lag_seconds",
            "Seconds between the authority sending the last event and this sidecar applying it.",
            value=feed.last_lag,
        )
    if feed.last_reconnect is not None:
        yield GaugeMetricFamily(
            "agent_authz_revocation_feed_reconnect_seconds",
            "Seconds from losing the stream to the next snapshot, of the last reconnection.",
            value=feed.last_reconnect,
        )
    yield CounterMetricFamily(
        "agent_authz_revocation_feed_reconnects", "Feed streams opened after the first.", value=feed.reconnects
    )
    events = CounterMetricFamily(
        "agent_authz_revocation_feed_events", "Feed events received, by event.", labels=["event"]
    )
    for name, count in sorted(feed.events.items()):
        events.add_metric([name], count)
    yield events
    yield GaugeMetricFamily(
        "agent_authz_revocation_feed_entries", "Revocation entries in force from the feed.", value=feed.entries
    )
    forwarded = CounterMetricFamily(
        "agent_authz_revocation_feed_forwarded",
        "Local revocations forwarded to the authority, by outcome (accepted, failed: an attempt that failed).",
        labels=["outcome"],
    )
    forwarded.add_metric(["accepted"], feed.forwarded)
    forwarded.add_metric(["failed"], feed.forward_failures)
    yield forwarded


class WebhookMetrics:
    """The metrics of the admission webhook process (its own registry).

    Args:
        outcomes: every outcome label value (:class:`~sidecar.inject.podspec.AdmissionOutcome`), so
            each has a sample from the start.
    """

    def __init__(self, outcomes: Iterable[str]) -> None:
        self.registry = CollectorRegistry()
        self._admissions = Counter(
            "agent_authz_webhook_admissions",
            "AdmissionReviews answered, by outcome (unanswerable: not a review, HTTP 400).",
            ["outcome"],
            registry=self.registry,
        )
        self._children = {str(outcome): self._admissions.labels(str(outcome)) for outcome in outcomes}

    def observe(self, outcome: str) -> None:
        """Count one review with ``outcome``."""
        self._children[outcome].inc()

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


@dataclass(frozen=True, slots=True)
class AuthorityState:
    """What the authority's scrape-time metrics read (plain values, so this module imports nothing of
    :mod:`sidecar.authority`)."""

    ready: bool
    feed_clients: int
    feed_events: Mapping[str, int]
    feed_slow_disconnects: int
    revocation_entries: int
    configmap_writes: Mapping[str, int] = field(default_factory=dict)
    configmap_conflicts: Mapping[str, int] = field(default_factory=dict)
    watch_restarts: Mapping[str, int] = field(default_factory=dict)
    published_keys: Mapping[str, int] = field(default_factory=dict)


class AuthorityMetrics:
    """The metrics of the cluster authority process (``agent-authz authority``; its own registry).

    Args:
        state: returns the authority's state at scrape time.
    """

    def __init__(self, state: Callable[[], AuthorityState]) -> None:
        self.registry = CollectorRegistry()
        self._revocations = Counter(
            "agent_authz_authority_revocations",
            "Revoked task ids submitted to the authority, by listener (public, feed) and outcome "
            "(accepted, refused: no authority, or the list did not verify).",
            ["listener", "outcome"],
            registry=self.registry,
        )
        self._announcements = Counter(
            "agent_authz_authority_key_announcements",
            "Key announcements from sidecars, by outcome (accepted, refused).",
            ["outcome"],
            registry=self.registry,
        )
        self._persist = Histogram(
            "agent_authz_authority_revocation_persist_seconds",
            "Time to persist one submitted list in the Kubernetes API (read-modify-write, conflicts included).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_AuthorityCollector(state))

    def revocation(self, listener: str, outcome: str, count: int = 1) -> None:
        """Count ``count`` ids with ``outcome`` on ``listener``."""
        if count:
            self._revocations.labels(listener, outcome).inc(count)

    def announcement(self, outcome: str) -> None:
        """Count one key announcement."""
        self._announcements.labels(outcome).inc()

    def persisted(self, seconds: float) -> None:
        """Observe the time one list took to persist."""
        self._persist.observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


class _AuthorityCollector(Collector):
    def __init__(self, state: Callable[[], AuthorityState]) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        state = self._state()
        yield GaugeMetricFamily(
            "agent_authz_authority_ready", "1 once both ConfigMaps have been read.", value=int(state.ready)
        )
        yield GaugeMetricFamily(
            "agent_authz_authority_feed_clients", "Revocation feed streams connected now.", value=state.feed_clients
        )
        events = CounterMetricFamily(
            "agent_authz_authority_feed_events",
            "Feed events sent, by event (snapshot, revoked, heartbeat).",
            labels=["event"],
        )
        for name, count in sorted(state.feed_events.items()):
            events.add_metric([name], count)
        yield events
        yield CounterMetricFamily(
            "agent_authz_authority_feed_slow_disconnects",
            "Feed streams closed because the client did not take its events (it reconnects for a snapshot).",
            value=state.feed_slow_disconnects,
        )
        yield GaugeMetricFamily(
            "agent_authz_authority_revocation_entries",
            "Revocation entries held (the ConfigMap's revocations.json and operator lines).",
            value=state.revocation_entries,
        )
        writes = CounterMetricFamily(
            "agent_authz_authority_configmap_writes",
            "ConfigMap writes that succeeded, by ConfigMap.",
            labels=["configmap"],
        )
        conflicts = CounterMetricFamily(
            "agent_authz_authority_configmap_conflicts",
            "409 Conflict answers to ConfigMap writes (each retried on the newer version), by ConfigMap.",
            labels=["configmap"],
        )
        restarts = CounterMetricFamily(
            "agent_authz_authority_watch_restarts",
            "ConfigMap watches resumed or restarted (server timeout, 410 Gone, errors), by ConfigMap.",
            labels=["configmap"],
        )
        for family, values in (
            (writes, state.configmap_writes),
            (conflicts, state.configmap_conflicts),
            (restarts, state.watch_restarts),
        ):
            for configmap, count in sorted(values.items()):
                family.add_metric([configmap], count)
            yield family
        keys = GaugeMetricFamily(
            "agent_authz_authority_published_keys", "Keys in each namespace's JWKS.", labels=["namespace"]
        )
        for namespace, count in sorted(state.published_keys.items()):
            keys.add_metric([namespace], count)
        yield keys
