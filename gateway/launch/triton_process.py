"""Run the tritonserver installed by tools/setup_triton.py (build/triton) as a child process.

    with TritonProcess("build/model_repository") as triton:
        client = tritonclient.grpc.InferenceServerClient(triton.grpc_url)

    python -m gateway.launch.triton_process --repository build/model_repository   # foreground

start() launches tritonserver (free ports unless given, LD_LIBRARY_PATH for its bundled
libraries, the Python backend directory, --model-control-mode=none, --exit-on-error) with its
output in a log file, and returns once the server and every model of the repository are
ready; a failure or timeout raises TritonStartError with the tail of the log. stop() sends
SIGTERM and kills after a timeout; kill() kills at once.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TRITON_DIR = PROJECT_ROOT / "build" / "triton"
PYLIB_ENV = "ASR_TRITON_PYLIB"   # fallback for model.py when config.pbtxt has no pylib_dir


class TritonStartError(RuntimeError):
    """tritonserver exited or did not become ready in time."""


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def repository_models(repository: Path) -> list[str]:
    """Model names of a repository (directories holding a config.pbtxt)."""
    return sorted(p.parent.name for p in Path(repository).glob("*/config.pbtxt"))


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort only
        pass


class TritonProcess:
    """A tritonserver child process serving ``repository``."""

    def __init__(
        self,
        repository,
        *,
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        triton_dir=None,
        log_path=None,
        log_verbose: int = 0,
        startup_timeout_s: float = 180.0,
        stop_timeout_s: float = 20.0,
        models: list[str] | None = None,
        extra_args: list[str] | None = None,
        env: dict | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.repository = Path(repository).resolve()
        self.triton_dir = Path(triton_dir or os.environ.get("ASR_TRITON_DIR") or DEFAULT_TRITON_DIR).resolve()
        self._requested_ports = (grpc_port, http_port, metrics_port)
        self.grpc_port = self.http_port = self.metrics_port = 0
        self.host = host
        self.log_path = Path(log_path).resolve() if log_path else None
        self.log_verbose = int(log_verbose)
        self.startup_timeout_s = float(startup_timeout_s)
        self.stop_timeout_s = float(stop_timeout_s)
        self.models = list(models) if models is not None else None
        self.extra_args = list(extra_args or [])
        self.extra_env = dict(env or {})
        self.process: subprocess.Popen | None = None
        self._log_file = None
        self._tmp_log_dir = None

    # ------------------------------------------------------------------ properties
    @property
    def executable(self) -> Path:
        return self.triton_dir / "bin" / "tritonserver"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def environment(self) -> dict:
        env = dict(os.environ)
        lib = str(self.triton_dir / "lib")
        old = env.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = lib + (":" + old if old else "")
        pylib = self.triton_dir / "pylib"
        if pylib.is_dir():
            env.setdefault(PYLIB_ENV, str(pylib))
        env.update(self.extra_env)
        return env

    def command(self) -> list[str]:
        return [
            str(self.executable),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.triton_dir / 'backends'}",
            f"--cache-directory={self.triton_dir / 'caches'}",
            "--model-control-mode=none",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--grpc-port={self.grpc_port}",
            f"--http-port={self.http_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--exit-timeout-secs=5",
            # no GPU here: skip the pinned (CUDA host) memory pool
            "--pinned-memory-pool-byte-size=0",
            # Python backend <-> stub shared memory: encoder outputs are ~3 MB per request
            f"--backend-config=python,shm-default-byte-size={16 << 20}",
            f"--backend-config=python,shm-growth-byte-size={16 << 20}",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            text = f.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ lifecycle
    def _check_installation(self) -> None:
        if not self.executable.exists():
            raise TritonStartError(
                f"{self.executable} not found: run `python tools/setup_triton.py --dest {self.triton_dir}` "
                "(make setup)")
        if not self.repository.is_dir():
            raise TritonStartError(f"model repository {self.repository} not found (make export)")
        if not repository_models(self.repository):
            raise TritonStartError(f"model repository {self.repository} holds no model (no */config.pbtxt)")

    def _pick_ports(self) -> None:
        chosen = []
        for port in self._requested_ports:
            if port:
                chosen.append(int(port))
                continue
            while True:
                p = find_free_port()
                if p not in chosen:
                    chosen.append(p)
                    break
        self.grpc_port, self.http_port, self.metrics_port = chosen

    def start(self) -> TritonProcess:
        if self.running:
            return self
        self._check_installation()
        auto_ports = not all(self._requested_ports)
        attempts = 3 if auto_ports else 1
        for attempt in range(attempts):
            self._pick_ports()
            self._launch()
            try:
                self._wait_ready()
                return self
            except TritonStartError:
                tail = self.log_tail(80)
                self.stop()
                port_clash = "already in use" in tail.lower()
                if auto_ports and port_clash and attempt + 1 < attempts:
                    continue
                raise
        raise TritonStartError("unreachable")

    def _launch(self) -> None:
        if self.log_path is None:
            self._tmp_log_dir = tempfile.mkdtemp(prefix="tritonserver-")
            self.log_path = Path(self._tmp_log_dir) / "tritonserver.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab", buffering=0)
        self._log_file.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.command())}\n".encode())
        in_main_thread = threading.current_thread() is threading.main_thread()
        self.process = subprocess.Popen(
            self.command(),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.environment(),
            cwd=str(self.triton_dir),
            # die with the parent (PR_SET_PDEATHSIG is per thread: only from the main thread)
            preexec_fn=_die_with_parent if (in_main_thread and sys.platform.startswith("linux")) else None,
        )

    def _wait_ready(self) -> None:
        import tritonclient.grpc as grpcclient

        models = self.models if self.models is not None else repository_models(self.repository)
        deadline = time.monotonic() + self.startup_timeout_s
        client = grpcclient.InferenceServerClient(self.grpc_url)
        last_error = ""
        try:
            while True:
                code = self.process.poll()
                if code is not None:
                    raise TritonStartError(
                        f"tritonserver exited with code {code} while starting (log: {self.log_path}):\n"
                        f"{self.log_tail()}")
                try:
                    if client.is_server_live(client_timeout=2.0) and client.is_server_ready(client_timeout=2.0):
                        not_ready = [m for m in models if not client.is_model_ready(m, client_timeout=2.0)]
                        if not not_ready:
                            return
                        last_error = f"models not ready: {', '.join(not_ready)}"
                    else:
                        last_error = "server not ready"
                except Exception as error:  # noqa: BLE001 - not up yet
                    last_error = str(error).splitlines()[0] if str(error) else type(error).__name__
                if time.monotonic() > deadline:
                    raise TritonStartError(
                        f"tritonserver not ready after {self.startup_timeout_s:.0f} s ({last_error}; "
                        f"log: {self.log_path}):\n{self.log_tail()}")
                time.sleep(0.25)
        finally:
            client.close()

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM, wait up to ``timeout_s`` (default stop_timeout_s), then SIGKILL. Returns the exit code."""
        timeout_s = self.stop_timeout_s if timeout_s is None else timeout_s
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                try:
                    self.process.send_signal(signal.SIGTERM)
                    code = self.process.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    code = self.process.wait(timeout=10)
            else:
                code = self.process.returncode
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return code

    def kill(self) -> int | None:
        """SIGKILL at once, its Python backend stubs too (a crashed server, for fault tests: a
        stub outlives a killed server for minutes otherwise); returns the exit code."""
        if self.process is not None and self.process.poll() is None:
            import psutil

            try:
                stubs = psutil.Process(self.process.pid).children(recursive=True)
            except psutil.Error:
                stubs = []
            self.process.kill()
            self.process.wait(timeout=30)
            for stub in stubs:
                try:
                    stub.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(stubs, timeout=30)
        return self.stop()

    def __enter__(self) -> TritonProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"TritonProcess({self.repository}, grpc={self.grpc_url}, {state})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run build/triton's tritonserver in the foreground.")
    ap.add_argument("--repository", default=str(PROJECT_ROOT / "build" / "model_repository"))
    ap.add_argument("--triton-dir", default=None, help=f"default {DEFAULT_TRITON_DIR}")
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--metrics-port", type=int, default=8002)
    ap.add_argument("--host", default="127.0.0.1", help="host the printed URLs use")
    ap.add_argument("--log-file", default=str(PROJECT_ROOT / "build" / "logs" / "tritonserver.log"))
    ap.add_argument("--log-verbose", type=int, default=0)
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    args = ap.parse_args(argv)

    for port in (args.grpc_port, args.http_port, args.metrics_port):
        if port and _port_in_use(port):
            print(f"error: port {port} is already in use (pass another --grpc/http/metrics-port, 0 = free)",
                  file=sys.stderr)
            return 2
    triton = TritonProcess(args.repository, grpc_port=args.grpc_port or None, http_port=args.http_port or None,
                           metrics_port=args.metrics_port or None, triton_dir=args.triton_dir,
                           log_path=args.log_file, log_verbose=args.log_verbose,
                           startup_timeout_s=args.startup_timeout, host=args.host)
    stop = threading.Event()

    def _stop(*_):
        stop.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    print(f"starting {triton.executable} with {triton.repository} (log: {args.log_file})", flush=True)
    try:
        triton.start()
    except TritonStartError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"tritonserver ready: grpc {triton.grpc_url}, http {triton.http_url}, metrics {triton.metrics_url}; "
          f"models: {', '.join(repository_models(triton.repository))}. Ctrl-C stops it.", flush=True)
    try:
        while not stop.wait(0.5):
            if not triton.running:
                print(f"tritonserver exited (code {triton.process.returncode}):\n{triton.log_tail()}",
                      file=sys.stderr)
                return 1
    finally:
        code = triton.stop()
        print(f"tritonserver stopped (code {code})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
