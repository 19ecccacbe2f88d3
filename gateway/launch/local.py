"""A local stack: tritonserver (from build/triton) + the gateway, on this machine.

    python -m gateway.launch.local serve   # foreground, with the review workbench (URL printed); Ctrl-C stops all
    python -m gateway.launch.local demo    # start, transcribe + analyse data/calls into tickets, a ledger and a dashboard, stop
                                           # (at a terminal: the workbench stays up on those tickets until Ctrl-C)

Used by `make serve`, `make demo` and the test session.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.launch.triton_process import TritonProcess, find_free_port

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_DIR = PROJECT_ROOT / "build" / "models" / "whisper-base"
DEFAULT_REPOSITORY = PROJECT_ROOT / "build" / "model_repository"
DEFAULT_DEMO_INPUT = PROJECT_ROOT / "data" / "calls"  # 20 synthesized hotline calls (tools/synth_calls.py)
DEFAULT_DEMO_OUT = PROJECT_ROOT / "out" / "demo"


class GatewayStartError(RuntimeError):
    """The gateway process exited or never reported SERVING."""


def wait_for_serving(
    address: str, timeout_s: float, process: subprocess.Popen | None = None, log_path: Path | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Until the gateway's health says SERVING (``credentials``: a TLS gateway; health needs no API key)."""
    deadline = time.monotonic() + timeout_s
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:] if log_path and log_path.exists() else ""
                raise GatewayStartError(f"gateway exited with code {process.returncode}:\n{tail}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise GatewayStartError(f"gateway at {address} not SERVING after {timeout_s:.0f} s")


class GatewayProcess:
    """`python -m gateway.service.server` in a child process."""

    def __init__(
        self, model_dir: Path, triton_url: str, *, port: int | None = None, log_path: Path | None = None,
        extra_args: list[str] | None = None, credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.triton_url = triton_url
        self.port = port or find_free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self.extra_args = extra_args or []
        self.credentials = credentials  # TLS gateway (extra_args with --tls-cert): how to reach its health
        self.process: subprocess.Popen | None = None
        self._log_file = None

    def start(self, timeout_s: float = 60.0) -> "GatewayProcess":
        cmd = [
            sys.executable, "-m", "gateway.service.server",
            "--model-dir", str(self.model_dir),
            "--triton", self.triton_url,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            *self.extra_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
        self._log_file = open(self.log_path, "ab") if self.log_path else None
        self.process = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)
        wait_for_serving(self.address, timeout_s, self.process, self.log_path, self.credentials)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "GatewayProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _start_stack(args, gateway_args: list[str] | None = None) -> tuple[TritonProcess, GatewayProcess]:
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"starting tritonserver with {args.repository} (log: {log_dir / 'triton.log'})", flush=True)
    triton = TritonProcess(Path(args.repository), grpc_port=args.triton_grpc_port, log_path=log_dir / "triton.log")
    triton.start()
    print(f"triton ready at {triton.grpc_url}; starting gateway (log: {log_dir / 'gateway.log'})", flush=True)
    gateway = GatewayProcess(Path(args.model_dir), triton.grpc_url, port=args.port, log_path=log_dir / "gateway.log", extra_args=gateway_args)
    try:
        gateway.start()
    except Exception:
        triton.stop()
        raise
    print(f"gateway SERVING at {gateway.address}", flush=True)
    return triton, gateway


def _start_workbench(args, gateway, history_db: Path | None = None):
    """The review workbench (gateway/web) in front of the gateway; prints its URL."""
    from gateway.web.process import WorkbenchProcess

    workbench = WorkbenchProcess(gateway.address, port=args.web_port, history_db=history_db, log_path=Path(args.log_dir) / "workbench.log")
    workbench.start()
    print(workbench.banner(), flush=True)
    return workbench


def cmd_serve(args) -> int:
    triton, gateway = _start_stack(args)
    try:
        workbench = _start_workbench(args, gateway)
    except Exception:
        gateway.stop()
        triton.stop()
        raise
    stop = {"flag": False}

    def _stop(*_):
        stop["flag"] = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    print("press Ctrl-C to stop", flush=True)
    try:
        while not stop["flag"]:
            if gateway.process.poll() is not None or not triton.running:
                print("a child process exited; stopping", file=sys.stderr)
                break
            time.sleep(0.5)
    finally:
        workbench.stop()
        gateway.stop()
        triton.stop()
        print("stopped workbench, triton and gateway", flush=True)
    return 0


def cmd_demo(args) -> int:
    """The main job on the embedded default: the synthesized hotline calls -> tickets and a ledger."""
    from gateway.clients.batch import BatchError, run_batch

    input_dir = Path(args.input_dir)
    out_dir = Path(args.out)
    triton, gateway = _start_stack(args, ["--history-db", str(out_dir / "history.sqlite")])
    try:
        workbench = _start_workbench(args, gateway, out_dir / "history.sqlite")
    except Exception:
        gateway.stop()
        triton.stop()
        raise
    try:
        summary = run_batch(
            input_dir,
            out_dir,
            server=gateway.address,
            concurrency=args.concurrency,
            history_db=out_dir / "history.sqlite",
        )
    except BatchError as error:
        print(f"batch failed: {error}", file=sys.stderr)
        workbench.stop()
        gateway.stop()
        triton.stop()
        return 2
    except BaseException:
        workbench.stop()
        gateway.stop()
        triton.stop()
        raise
    print(
        f"\n{summary.transcribed} transcribed, {summary.skipped} already done, {summary.failed} failed; "
        f"{summary.audio_seconds:.0f} s of audio in {summary.wall_seconds:.1f} s ({summary.throughput:.1f}x real time)"
    )
    print(f"results: {out_dir}/  (ledger.xlsx, dashboard.html, <call>.json, failures.csv)")
    try:
        if sys.stdin.isatty():  # at a terminal the stack stays up for the workbench until Ctrl-C
            print(f"{workbench.banner()}\npress Ctrl-C to stop", flush=True)
            while workbench.process.poll() is None and gateway.process.poll() is None:
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        workbench.stop()
        gateway.stop()
        triton.stop()
    return 1 if summary.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.launch.local", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func in (("serve", cmd_serve), ("demo", cmd_demo)):
        p = sub.add_parser(name)
        p.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR))
        p.add_argument("--repository", default=str(DEFAULT_REPOSITORY))
        p.add_argument("--port", type=int, default=50051 if name == "serve" else None)
        p.add_argument("--triton-grpc-port", type=int, default=8001 if name == "serve" else None)
        p.add_argument("--log-dir", default=str(PROJECT_ROOT / "build" / "logs"))
        p.add_argument("--web-port", type=int, default=8080, help="the review workbench (a free port when taken)")
        p.set_defaults(func=func)
        if name == "demo":
            p.add_argument("input_dir", nargs="?", default=str(DEFAULT_DEMO_INPUT), help="folder of recordings")
            p.add_argument("--out", default=str(DEFAULT_DEMO_OUT))
            p.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
