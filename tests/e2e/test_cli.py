"""The ``agent-authz`` command: exit codes, error messages and the rendered Envoy config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sidecar.envoy_bin import find_envoy
from tests.support.config import API_HOST, base_config, task, write_config, write_keys

pytestmark = pytest.mark.e2e


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    write_keys(tmp_path)
    return write_config(tmp_path, base_config(tmp_path, [task()], {API_HOST: "127.0.0.1:9"}))


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["--url", f"http://{API_HOST}/v1/items/1"], 0, "allow allowed"),
        (["--url", f"http://{API_HOST}/v1/other"], 1, "deny path_not_allowed"),
        (["--url", f"http://{API_HOST}/v1/items/1", "--method", "POST"], 1, "deny method_not_allowed"),
        (["--url", f"http://{API_HOST}/v1/items/1", "--task", "ghost"], 1, "deny unknown_task"),
        (["--url", f"http://{API_HOST}/v1/items/a;b"], 1, "deny bad_request"),
        (["--url", "not-a-url"], 2, "absolute http(s) URL"),
        (["--url", f"http://{API_HOST}/", "--header", "no-colon"], 2, "--header"),
    ],
)
def test_check_exit_codes(config: Path, args: list[str], code: int, text: str) -> None:
    result = run("check", "--config", str(config), *args)
    assert result.returncode == code, result.stderr
    assert text in result.stdout + result.stderr


def test_check_json(config: Path) -> None:
    result = run("check", "--config", str(config), "--url", f"http://{API_HOST}/v1/items/1", "--json")
    data = json.loads(result.stdout)
    assert data["decision"] == "allow" and data["token"]["aud"] == "https://api.internal"
    assert "eyJ" not in result.stdout


def test_check_bad_config_is_exit_2_with_file_field_reason(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text("agent: spiffe://x.org/a\nissuer: {url: u, signing_key: k.pem}\ntasks: [{id: t}]\n")
    result = run("check", "--config", str(path), "--url", "http://h/")
    assert result.returncode == 2
    assert f"{path}: tasks[0].agent: Field required" in result.stderr


def test_serve_refuses_unreadable_key(tmp_path: Path, config: Path) -> None:
    (tmp_path / "keys" / "signing.pem").write_text("garbage")
    result = run("serve", "--config", str(config))
    assert result.returncode == 2
    assert "issuer.signing_key" in result.stderr and "not an unencrypted PEM private key" in result.stderr


def test_serve_refuses_missing_config(tmp_path: Path) -> None:
    result = run("serve", "--config", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_envoy_config_validates_with_real_envoy(config: Path, tmp_path: Path) -> None:
    out = tmp_path / "envoy.json"
    result = run("envoy-config", "--config", str(config), "--out", str(out))
    assert result.returncode == 0, result.stderr
    validate = subprocess.run(
        [str(find_envoy()), "--mode", "validate", "-c", str(out)], capture_output=True, text=True, timeout=60
    )
    assert validate.returncode == 0, validate.stderr[-2000:]
    assert "OK" in validate.stdout + validate.stderr


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_rendered_config_enforces_fail_closed_and_path_normalization(config: Path, transport: str) -> None:
    settings = yaml.safe_load(config.read_text())
    settings.setdefault("envoy", {})["authz_transport"] = transport
    config.write_text(yaml.safe_dump(settings))
    bootstrap = json.loads(run("envoy-config", "--config", str(config)).stdout)
    listener = bootstrap["staticResources"]["listeners"][0]
    hcm = listener["filterChains"][0]["filters"][0]["typedConfig"]
    assert hcm["normalizePath"] is True and hcm["mergeSlashes"] is True
    assert hcm["pathWithEscapedSlashesAction"] == "REJECT_REQUEST"
    if transport == "http":  # before ext_authz only the removal of the client's own x-agent-authz-*
        strip, ext_authz = hcm["httpFilters"][:2]
        (mutation,) = strip["typedConfig"]["mutations"]["requestMutations"]
        assert mutation == {"removeOnMatch": {"keyMatcher": {"prefix": "x-agent-authz-"}}}
    else:
        ext_authz = hcm["httpFilters"][0]
    assert ext_authz["name"] == "envoy.filters.http.ext_authz"
    assert not ext_authz["typedConfig"].get("failureModeAllow", False)
    if transport == "grpc":
        assert ext_authz["typedConfig"]["grpcService"]["timeout"] == "0.250s"
    else:  # Envoy's HTTP service: the same timeout, 503 on error, the client's x-agent-authz-* never sent
        service = ext_authz["typedConfig"]["httpService"]
        assert service["serverUri"]["timeout"] == "0.250s" and service["serverUri"]["cluster"] == "agent_authz_http"
        assert ext_authz["typedConfig"]["statusOnError"] == {"code": "ServiceUnavailable"}
        (withheld,) = ext_authz["typedConfig"]["disallowedHeaders"]["patterns"]
        assert withheld["safeRegex"]["regex"].startswith("x\\-agent\\-authz\\-")
    for vhost in hcm["routeConfig"]["virtualHosts"]:
        ctx = vhost["typedPerFilterConfig"]["envoy.filters.http.ext_authz"]["checkSettings"]["contextExtensions"]
        assert ctx == {"direction": "egress"}
        if transport == "http":  # the same context in each route's metadata, which the HTTP service sends
            for route in vhost["routes"]:
                assert route["metadata"]["filterMetadata"]["envoy.filters.http.ext_authz"] == {"direction": "egress"}
    admin = bootstrap["admin"]["address"]["pipe"]  # a Unix socket only its owner may connect to, never TCP
    assert admin["path"].endswith("/envoy-admin.sock") and admin["mode"] == 0o600


def test_dev_ca_init_and_issue(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    assert run("dev-ca", "init", "--trust-domain", "example.org", "--out", str(ca_dir)).returncode == 0
    assert oct((ca_dir / "ca.key").stat().st_mode & 0o777) == "0o600"
    result = run(
        "dev-ca",
        "issue",
        "spiffe://example.org/ns/x/sa/y",
        "--out",
        str(tmp_path / "svids"),
        "--ca",
        str(ca_dir),
        "--ttl",
        "10m",
        "--jwt",
        "--audience",
        "spiffe://example.org/ns/z",
    )
    assert result.returncode == 0, result.stderr
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((tmp_path / "svids" / "y.pem").read_bytes())
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 600 <= lifetime.total_seconds() <= 700
    from sidecar.identity.bundles import TrustBundles
    from sidecar.identity.jwtsvid import JwtSvidVerifier
    from sidecar.identity.state import parse_jwt_bundle

    bundles = TrustBundles(jwt={"example.org": parse_jwt_bundle((ca_dir / "jwt-bundle.json").read_bytes())})
    import time

    token = (tmp_path / "svids" / "y.jwt").read_text()
    assert (
        JwtSvidVerifier(bundles, ["spiffe://example.org/ns/z"]).verify(token, now=time.time()).spiffe_id.endswith("/y")
    )


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["init", "--trust-domain", "Bad.Domain", "--out", "{tmp}/x"], "lower case"),
        (["issue", "spiffe://example.org/a", "--out", "{tmp}/none"], "not a dev CA directory"),
        (["issue", "spiffe://example.org/a", "--out", "{tmp}", "--ttl", "soon"], "invalid duration"),
        (["issue", "not-an-id", "--out", "{tmp}"], "not a dev CA directory"),
    ],
)
def test_dev_ca_bad_input(tmp_path: Path, args: list[str], text: str) -> None:
    result = run("dev-ca", *[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2 and text in result.stderr


def test_spire_mode_renders_sds_from_the_agent_socket(tmp_path: Path) -> None:
    write_keys(tmp_path)
    config = base_config(tmp_path, [task()])
    config["identity"] = {"source": "workload_api", "workload_api": {"socket": "unix:///run/spire/sockets/agent.sock"}}
    config["envoy"]["local_app"] = "127.0.0.1:8080"
    path = write_config(tmp_path, config)
    out = tmp_path / "envoy.json"
    assert run("envoy-config", "--config", str(path), "--out", str(out)).returncode == 0
    bootstrap = json.loads(out.read_text())
    clusters = {c["name"]: c for c in bootstrap["staticResources"]["clusters"]}
    pipe = clusters["spire_agent"]["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]["pipe"]
    assert pipe["path"] == "/run/spire/sockets/agent.sock"
    ingress = next(lst for lst in bootstrap["staticResources"]["listeners"] if lst["name"] == "ingress_https")
    tls = ingress["filterChains"][0]["transportSocket"]["typedConfig"]
    assert tls["requireClientCertificate"] is True
    common = tls["commonTlsContext"]
    assert common["tlsCertificateSdsSecretConfigs"][0]["name"] == "default"
    assert common["validationContextSdsSecretConfig"]["name"] == "ALL"
    validate = subprocess.run(
        [str(find_envoy()), "--mode", "validate", "-c", str(out)], capture_output=True, text=True, timeout=60
    )
    assert validate.returncode == 0, validate.stderr[-2000:]


def test_file_identity_renders_file_sds(tmp_path: Path) -> None:
    from tests.support.config import add_file_identity

    write_keys(tmp_path)
    config = base_config(tmp_path, [task()])
    add_file_identity(tmp_path, config, local_app="127.0.0.1:8080")
    path = write_config(tmp_path, config)
    assert (
        "envoy.sds_dir" in run("envoy-config", "--config", str(path)).stderr
    )  # stdout rendering needs a place for SDS
    out = tmp_path / "envoy.json"
    assert run("envoy-config", "--config", str(path), "--out", str(out)).returncode == 0
    sds = json.loads((tmp_path / "envoy-sds" / "bundles.json").read_text())["resources"][0]
    validator = sds["validationContext"]["customValidatorConfig"]
    assert validator["name"] == "envoy.tls.cert_validator.spiffe"
    assert {td["name"] for td in validator["typedConfig"]["trustDomains"]} == {"test.example", "partner.example"}
    validate = subprocess.run(
        [str(find_envoy()), "--mode", "validate", "-c", str(out)], capture_output=True, text=True, timeout=60
    )
    assert validate.returncode == 0, validate.stderr[-2000:]
