"""docker-compose.yml cannot run here (no Docker engine): check it by parsing."""

from __future__ import annotations

import importlib
import subprocess
import sys

import yaml

from tests.conftest import PROJECT_ROOT


def test_compose_file_is_consistent():
    compose = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"triton", "gateway", "workbench"}
    for name, service in services.items():
        assert "healthcheck" in service, name
        dockerfile = PROJECT_ROOT / service["build"]["dockerfile"]
        assert dockerfile.is_file(), dockerfile
    assert any(v.endswith(":/models:ro") for v in services["triton"]["volumes"])
    assert services["gateway"]["depends_on"]["triton"]["condition"] == "service_healthy"
    assert "--triton=triton:8001" in services["gateway"]["command"]
    # the workbench reaches the ASR only through the gateway, and reads the history it writes
    assert services["workbench"]["depends_on"]["gateway"]["condition"] == "service_healthy"
    assert "--gateway=gateway:50051" in services["workbench"]["command"]
    history = [v for v in services["gateway"]["volumes"] if v.startswith("./var:")]
    assert history and any(v.startswith("./var:") for v in services["workbench"]["volumes"])
    # the gateway's healthcheck runs a module that exists
    probe = services["gateway"]["healthcheck"]["test"]
    importlib.import_module(probe[probe.index("-m") + 1])


def test_healthcheck_reports_not_serving_when_nothing_listens():
    from gateway.launch.triton_process import find_free_port

    result = subprocess.run(
        [sys.executable, "-m", "gateway.clients.healthcheck", f"127.0.0.1:{find_free_port()}", "--timeout", "1"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert result.stdout.strip() == "NOT_SERVING"


def test_healthcheck_reports_serving(gateway):
    result = subprocess.run(
        [sys.executable, "-m", "gateway.clients.healthcheck", gateway.address], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
