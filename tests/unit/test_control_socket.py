"""Control sockets: a directory only the proxy user may change, a socket only it may connect to."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from sidecar.config.loader import load_config
from sidecar.control_socket import prepare_socket_dir, restrict_socket, tcp_control_endpoints
from sidecar.errors import ConfigError
from tests.support.config import base_config, task, write_config, write_keys


def test_a_missing_directory_is_created_0700(tmp_path: Path) -> None:
    path = tmp_path / "run" / "ctl" / "authz.sock"
    prepare_socket_dir(path, file="f", field="listen.authz")
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    prepare_socket_dir(path, file="f", field="listen.authz")  # again: fine (the other container got there first)


def test_a_bound_socket_is_made_0600(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        restrict_socket(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757, 0o1777])
def test_a_directory_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(mode)
    with pytest.raises(ConfigError, match="writable by group or others") as caught:
        prepare_socket_dir(directory / "authz.sock", file="sidecar.yaml", field="listen.authz")
    assert caught.value.field == "listen.authz" and caught.value.file == "sidecar.yaml"


def test_a_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ConfigError, match="not a directory"):
        prepare_socket_dir(tmp_path / "link" / "authz.sock", file="f", field="envoy.admin_socket")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "theirs"
    directory.mkdir(mode=0o700)
    os.chown(directory, 1000, 1000)
    with pytest.raises(ConfigError, match="belongs to UID 1000"):
        prepare_socket_dir(directory / "authz.sock", file="f", field="listen.authz")


def test_a_path_too_long_for_sun_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="longer than 107 bytes"):
        prepare_socket_dir(tmp_path / ("x" * 120) / "a.sock", file="f", field="listen.authz")


def test_tcp_control_endpoints_are_named(tmp_path: Path) -> None:
    write_keys(tmp_path)
    config = base_config(tmp_path, [task()])
    assert tcp_control_endpoints(load_config(write_config(tmp_path, config))) == []
    config["listen"]["authz"] = "127.0.0.1:9191"
    config["envoy"].update(admin_socket=None, admin_port=15000)
    assert tcp_control_endpoints(load_config(write_config(tmp_path, config))) == [
        ("listen.authz", "127.0.0.1:9191"),
        ("envoy.admin_port", "127.0.0.1:15000"),
    ]


def test_the_defaults_are_unix_sockets_in_the_control_directory_of_the_pod_layout() -> None:
    from sidecar.config.schema import CONTROL_DIR, EnvoySpec, ListenSpec
    from sidecar.inject import layout

    assert ListenSpec().authz == f"unix:{CONTROL_DIR}/authz.sock" == f"unix:{layout.AUTHZ_SOCKET}"
    assert EnvoySpec().admin_socket == CONTROL_DIR / "envoy-admin.sock" == Path(layout.ENVOY_ADMIN_SOCKET)
    assert Path(layout.CTL_DIR) == CONTROL_DIR and CONTROL_DIR.parent == Path(layout.RUN_DIR)
