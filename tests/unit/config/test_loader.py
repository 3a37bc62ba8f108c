"""Loading and validating sidecar.yaml: errors name the file, the field and the reason."""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from sidecar.config.durations import parse_duration
from sidecar.config.loader import load_config, parse_config
from sidecar.errors import ConfigError
from tests.support.config import AGENT, base_config, task


def _write(tmp_path: Path, config: dict[str, Any] | str) -> Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


def _config(tmp_path: Path, **task_overrides: Any) -> dict[str, Any]:
    return base_config(tmp_path, [task(**task_overrides)])


def test_valid_config_loads(tmp_path: Path) -> None:
    loaded = load_config(_write(tmp_path, _config(tmp_path)))
    assert loaded.settings.agent == AGENT
    assert loaded.settings.tasks[0].egress[0].methods == ["GET"]
    assert loaded.resolve(Path("keys/x.pem")) == tmp_path / "keys/x.pem"
    assert len(loaded.digest) == 64


@pytest.mark.parametrize(
    ("mutate", "field", "reason"),
    [
        (lambda c: c.pop("agent"), "", "set 'agent' or an 'identity' source"),
        (lambda c: c.update(agent="spiffe://Example.org/a"), "agent", "lower case"),
        (lambda c: c.update(agent="spiffe://example.org"), "agent", "needs a path"),
        (lambda c: c.update(surprise=1), "surprise", "Extra inputs"),
        (lambda c: c["issuer"].update(algorithm="HS256"), "issuer.algorithm", "ES256"),
        (lambda c: c["issuer"].update(max_token_ttl="forever"), "issuer.max_token_ttl", "invalid duration"),
        (lambda c: c["issuer"].update(max_token_ttl="2d"), "issuer.max_token_ttl", "between 1s and 24h"),
        (lambda c: c["listen"].update(authz="unix:relative.sock"), "listen.authz", "absolute"),
        (lambda c: c["listen"].update(admin="nohostport"), "listen.admin", "host:port"),
        (lambda c: c["tasks"][0].update(id="bad id!"), "tasks[0].id", "task id"),
        (lambda c: c["tasks"][0].update(agent="not-a-spiffe-id"), "tasks[0].agent", "spiffe://"),
        (lambda c: c["tasks"][0].pop("ttl"), "tasks[0]", "exactly one of 'expires_at' or 'ttl'"),
        (lambda c: c["tasks"][0].update(expires_at="2030-01-01T00:00:00Z"), "tasks[0]", "exactly one"),
        (lambda c: c["tasks"][0].update(ttl="0s"), "tasks[0]", "positive"),
        (
            lambda c: (c["tasks"][0].pop("ttl"), c["tasks"][0].update(expires_at="2030-01-01T00:00:00")),
            "tasks[0].expires_at",
            "timezone",
        ),
        (lambda c: c["tasks"][0]["egress"][0].update(host="*"), "tasks[0].egress[0].host", "DNS name"),
        (lambda c: c["tasks"][0]["egress"][0].update(host="a.*.com"), "tasks[0].egress[0].host", "DNS name"),
        (lambda c: c["tasks"][0]["egress"][0].update(port=70000), "tasks[0].egress[0].port", "less than or equal"),
        (lambda c: c["tasks"][0]["egress"][0].update(methods=[]), "tasks[0].egress[0].methods", "at least 1"),
        (lambda c: c["tasks"][0]["egress"][0].update(methods=["GE T"]), "tasks[0].egress[0].methods", "HTTP method"),
        (lambda c: c["tasks"][0]["egress"][0].update(paths=["v1/x"]), "tasks[0].egress[0].paths", "start with '/'"),
        (lambda c: c["tasks"][0]["egress"][0].update(paths=["/v1/../x"]), "tasks[0].egress[0].paths", "canonical"),
        (lambda c: c["tasks"][0]["egress"][0].update(paths=["/v1/*/x"]), "tasks[0].egress[0].paths", "final '/*'"),
        (lambda c: c["tasks"][0]["egress"][0].update(paths=["/v1/x?q=1"]), "tasks[0].egress[0].paths", "canonical"),
        (lambda c: c["tasks"][0]["egress"][0].update(max_calls=-1), "tasks[0].egress[0].max_calls", "greater than"),
        (
            lambda c: c["tasks"][0]["egress"][0].update(credential={"header": "host", "file": "k"}),
            "tasks[0].egress[0].credential.header",
            "cannot carry",
        ),
        (
            lambda c: c["tasks"][0]["egress"][0].update(credential={"header": "authorization", "file": "k"}),
            "tasks[0].egress[0]",
            "token: false",
        ),
        (lambda c: c["tasks"].append(dict(c["tasks"][0])), "tasks", "duplicate task id"),
        (lambda c: c["envoy"].update(destinations={"*.x.com": "1.2.3.4:80"}), "envoy.destinations", "exact DNS"),
        (lambda c: c["envoy"].update(destinations={"x.com": "1.2.3.4"}), "envoy.destinations", "host:port"),
    ],
)
def test_invalid_configs_name_file_field_and_reason(tmp_path: Path, mutate: Any, field: str, reason: str) -> None:
    config = _config(tmp_path)
    mutate(config)
    path = _write(tmp_path, config)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.file == str(path)
    assert err.field == field
    assert reason in str(err)
    assert str(err).startswith(f"{path}: {field}: " if field else f"{path}: ")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("agent: [unclosed", "invalid YAML"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("", "top level must be a mapping"),
        ("\x00\x01binary", "invalid YAML"),
    ],
)
def test_unparseable_files(tmp_path: Path, text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        load_config(_write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_oversized_file(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * (64 * 1024 * 1024 + 10))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(path)


def test_several_errors_are_all_reported(tmp_path: Path) -> None:
    config = _config(tmp_path)
    config["tasks"][0]["egress"][0]["methods"] = []
    config["tasks"][0]["egress"][0]["paths"] = ["x"]
    with pytest.raises(ConfigError, match=r"and 1 more: tasks\[0\]\.egress\[0\]\.paths"):
        load_config(_write(tmp_path, config))


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("250ms", 0.25), ("30s", 30), ("5m", 300), ("1h30m", 5400), ("1d", 86400), (12, 12.0), (0.5, 0.5)],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "5", "5x", "m5", "-5s", -1, True, None, "5m garbage", "1h 30m"])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("decision_log", "field", "reason"),
    [
        ({"path": None, "stdout": False}, "decision_log", "need a sink"),
        ({"path": None, "stdout": True, "rotate": {"keep": 3}}, "decision_log", "'rotate' needs a 'path'"),
        ({"path": "d.log", "rotate": {"max_bytes": "1KiB"}}, "decision_log.rotate.max_bytes", "at least 4 KiB"),
        ({"path": "d.log", "rotate": {"max_age": "10ms"}}, "decision_log.rotate.max_age", "at least 1s"),
        ({"path": "d.log", "on_log_failure": "ignore"}, "decision_log.on_log_failure", "'deny' or 'allow'"),
        ({"path": "d.log", "fsnyc": True}, "decision_log.fsnyc", "Extra inputs"),
    ],
)
def test_decision_log_settings_are_validated(
    tmp_path: Path, decision_log: dict[str, Any], field: str, reason: str
) -> None:
    config = _config(tmp_path)
    config["decision_log"] = decision_log
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, config))
    assert caught.value.field == field and reason in caught.value.reason


def test_decision_log_settings_load(tmp_path: Path) -> None:
    config = _config(tmp_path)
    config["dry_run"] = True
    config["decision_log"] = {
        "path": "d.log",
        "fsync": True,
        "hmac_key_file": "k",
        "rotate": {"max_bytes": "64MiB", "max_age": "1h", "keep": 2},
    }
    settings = load_config(_write(tmp_path, config)).settings
    assert settings.dry_run and settings.decision_log.on_log_failure == "deny"
    assert settings.decision_log.rotate.max_bytes == 64 * 1024 * 1024 and settings.decision_log.rotate.max_age == 3600


def _many(tmp_path: Path, count: int) -> dict[str, Any]:
    rules = [{"name": f"r{j}", "host": "api.internal", "methods": ["GET"], "paths": [f"/v{j}/*"]} for j in range(10)]
    return base_config(tmp_path, [task(f"t{i}", egress=[dict(r) for r in rules]) for i in range(count)])


@pytest.mark.parametrize("as_json", [False, True], ids=["yaml", "json"])
def test_errors_in_tasks_and_elsewhere_are_reported_as_for_the_whole_document(tmp_path: Path, as_json: bool) -> None:
    """Tasks are validated one at a time; one invalid task and the file is judged whole: every error,
    the other sections' first (their fields come before ``tasks``)."""
    config = _many(tmp_path, 3)
    config["tasks"][2]["egress"][1]["paths"] = ["x"]
    config["tasks"][0]["purpose"] = 7
    config["dry_run"] = "sometimes"
    path = tmp_path / "sidecar.yaml"
    path.write_text(orjson.dumps(config).decode() if as_json else yaml.safe_dump(config))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: dry_run: ") and "(and 2 more: " in message
    assert message.index("tasks[0].purpose: ") < message.index("tasks[2].egress[1].paths: 'x': path does not")


def test_a_duplicate_task_id_and_a_cross_task_conflict_are_still_found(tmp_path: Path) -> None:
    config = _many(tmp_path, 2)
    config["tasks"][1]["id"] = "t0"
    with pytest.raises(ConfigError, match=r"tasks: .*duplicate task id 't0'"):
        load_config(_write(tmp_path, config))
    config = _many(tmp_path, 2)
    config["tasks"][0]["egress"][0] |= {"host": "x.internal", "tls": "originate", "upstream_port": 8443}
    config["tasks"][1]["egress"][0] |= {"host": "x.internal", "tls": "originate", "upstream_port": 9443}
    with pytest.raises(ConfigError, match=r"one upstream per host"):
        load_config(_write(tmp_path, config))


def test_yaml_aliases_shared_between_tasks_load(tmp_path: Path) -> None:
    rule = "{host: a.internal, methods: [GET], paths: ['/x']}"
    rest = yaml.safe_dump({k: v for k, v in base_config(tmp_path, []).items() if k != "tasks"}).rstrip()
    text = "\n".join(
        [
            rest,
            "tasks:",
            f"  - {{id: a, agent: '{AGENT}', purpose: p, ttl: 1h, egress: &rules [{rule}]}}",
            f"  - {{id: b, agent: '{AGENT}', purpose: p, ttl: 1h, egress: *rules}}",
        ]
    )
    loaded = load_config(_write(tmp_path, text))
    assert [t.id for t in loaded.settings.tasks] == ["a", "b"]
    assert loaded.settings.tasks[0].egress == loaded.settings.tasks[1].egress


def test_the_parsed_document_and_the_models_are_never_both_whole_in_memory(tmp_path: Path) -> None:
    """Parsing peaks at about the models, not the models and the parsed document (the allocator
    keeps the pages of a peak: 1,000 tasks of 10 rules held ~7 MB parsed and ~17 MB of models at once)."""
    path = tmp_path / "sidecar.yaml"
    path.write_bytes(orjson.dumps(_many(tmp_path, 300)))
    raw = path.read_bytes()
    gc.collect()
    tracemalloc.start()
    try:
        document = orjson.loads(raw)
        parsed = tracemalloc.get_traced_memory()[0]
        del document
        parse_config(path, raw)  # once first: what a first load builds lazily is not the document
        gc.collect()
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        loaded = parse_config(path, raw)
        models = tracemalloc.get_traced_memory()[0] - start
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert len(loaded.settings.tasks) == 300
    assert peak < models + parsed * 3 / 4, (peak, models, parsed)  # before: models + parsed
