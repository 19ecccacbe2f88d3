"""`python -m gateway.web` in a child process (make serve, make demo): started after the gateway, URL printed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from gateway.web.auth import write_dev_users

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_USERS = PROJECT_ROOT / "var" / "web" / "users.yaml"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class WorkbenchProcess:
    def __init__(self, gateway_address: str, *, port: int | None = 8080, history_db: Path | None = None,
                 users: Path = DEFAULT_USERS, log_path: Path | None = None, host: str = "127.0.0.1") -> None:
        if port is None or not _port_free(port):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.gateway_address, self.port, self.host = gateway_address, port, host
        self.history_db, self.users, self.log_path = history_db, Path(users), log_path
        self.url = f"http://{host}:{port}/"
        self.password: str | None = None  # set when this start created the users file
        self.process: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout_s: float = 60.0) -> "WorkbenchProcess":
        if not self.users.exists():
            self.password = write_dev_users(self.users)
        cmd = [sys.executable, "-m", "gateway.web", "--gateway", self.gateway_address, "--host", self.host,
               "--port", str(self.port), "--users", str(self.users)]
        if self.history_db:
            cmd += ["--history-db", str(self.history_db)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
        self._log = open(self.log_path, "ab") if self.log_path else None
        self.process = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path and self.log_path.exists() else ""
                raise RuntimeError(f"workbench exited with code {self.process.returncode}:\n{tail}")
            try:
                urllib.request.urlopen(self.url + "healthz", timeout=1)
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"workbench not answering at {self.url} after {timeout_s:.0f} s")
                time.sleep(0.2)

    def banner(self) -> str:
        login = f"user admin, password {self.password} (saved hashed in {self.users})" if self.password else f"users from {self.users}"
        return f"workbench (工单核对台) at {self.url}  [{login}]"

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log:
            self._log.close()
            self._log = None
