"""The pod's resolvers from its resolv.conf, and the answered-address book behind the passthrough binding."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from sidecar.dns.answers import MAX_ADDRESSES, AddressBook
from sidecar.dns.resolv import read_nameservers
from sidecar.errors import ConfigError


def test_nameservers_in_order_at_most_three(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# kubelet\nsearch default.svc.cluster.local svc.cluster.local cluster.local\n"
        "nameserver 10.96.0.10\nnameserver not-an-ip\n; comment\nnameserver fe80::1%eth0 # scoped\n"
        "options ndots:5\nnameserver 10.0.0.2\nnameserver 10.0.0.3\n"
    )
    assert read_nameservers(conf, file="f") == (("10.96.0.10", 53), ("fe80::1%eth0", 53), ("10.0.0.2", 53))


@pytest.mark.parametrize("content", ["", "search x\n", "nameserver\n", "nameserver bogus\n"])
def test_no_nameserver_is_a_config_error(tmp_path: Path, content: str) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(content)
    with pytest.raises(ConfigError) as info:
        read_nameservers(conf, file="sidecar.yaml")
    assert info.value.field == "dns.resolv_conf" and "names no nameserver" in info.value.reason


def test_an_unreadable_or_huge_resolv_conf_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        read_nameservers(tmp_path / "missing", file="f")
    huge = tmp_path / "huge"
    huge.write_text("nameserver 10.0.0.1\n" * 5000)
    with pytest.raises(ConfigError, match="larger than"):
        read_nameservers(huge, file="f")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def test_addresses_expire_after_their_ttl_but_not_before_the_minimum() -> None:
    book = AddressBook(min_ttl=60)
    book.remember("a.example", [(_ip("10.0.0.1"), 5), (_ip("10.0.0.2"), 600)], now=1000)
    assert book.addresses("a.example", 1059) == {_ip("10.0.0.1"), _ip("10.0.0.2")}
    assert book.addresses("a.example", 1061) == {_ip("10.0.0.2")}
    assert book.addresses("a.example", 1601) == frozenset() and book.addresses("b.example", 0) == frozenset()
    book.remember("a.example", [(_ip("10.0.0.1"), 10**9)], now=0)
    assert book.addresses("a.example", 86399) and not book.addresses("a.example", 86401)  # at most a day


def test_the_book_is_bounded() -> None:
    book = AddressBook()
    book.remember("many.example", [(_ip(f"10.0.{i // 256}.{i % 256}"), 100 + i) for i in range(300)], now=0)
    kept = book.addresses("many.example", 0)
    assert len(kept) == MAX_ADDRESSES and _ip("10.0.1.43") in kept  # the longest-lived are kept
    book.remember("empty.example", [], now=0)
    assert len(book) == 1


def test_the_proxy_counts_under_the_metrics_labels() -> None:
    from sidecar.dns.proxy import OUTCOMES
    from sidecar.metrics import DNS_OUTCOMES, Metrics

    assert OUTCOMES == DNS_OUTCOMES
    metrics = Metrics()
    for outcome in OUTCOMES:
        metrics.dns_query(outcome)
    text = metrics.render().decode()
    assert all(f'agent_authz_dns_queries_total{{outcome="{o}"}} 1.0' in text for o in OUTCOMES)
