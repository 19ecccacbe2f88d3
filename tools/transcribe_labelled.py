"""Transcribe the synthesised labelled tickets (tools/synth_labelled.py) with a local stack.

    PYTHONPATH=. .venv/bin/python tools/transcribe_labelled.py --repository /tmp/snap-repo \
        [--audio /tmp/labelled_audio] [--out data/labelled/asr/asr_text.jsonl] [--deadline EPOCH]

Starts tritonserver (gateway.launch.triton_process.TritonProcess) on a rendered repository and
the gateway (gateway.launch.local.GatewayProcess) on build/models/whisper-base, then sends each
<id>.flac with Transcribe (language zh, beam 5, no analysis), `--concurrency` requests in
flight, and appends {"id", "asr_text", "asr_model", "audio_s"} per line to --out (ids already
there are skipped; asr_text is the response text exactly as returned). It follows the
synthesis: polls the audio folder for new files until every selected ticket is done, the
synthesiser (--synth-pid) has exited and no new file appears, or the deadline; then stops
both processes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(PROJECT_ROOT))

import grpc  # noqa: E402

from gateway.launch.local import DEFAULT_MODEL_DIR, GatewayProcess  # noqa: E402
from gateway.launch.triton_process import TritonProcess  # noqa: E402
from gateway.protocol import asr_pb2, asr_pb2_grpc  # noqa: E402
from synth_labelled import DEFAULT_FIRST_N, DEFAULT_WRITERS, select, transcribed_ids  # noqa: E402

ASR_MODEL = "whisper-base fp32 beam 5"


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audio", type=Path, default=Path("/tmp/labelled_audio"))
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "data" / "labelled" / "asr" / "asr_text.jsonl")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--repository", type=Path, required=True, help="rendered model repository (model_repository.render)")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/transcribe_labelled_logs"))
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--synth-pid", type=int, default=None, help="stop waiting for files once this process has exited")
    parser.add_argument("--deadline", type=float, default=None, help="unix time: submit nothing after it")
    parser.add_argument("--poll-s", type=float, default=3.0)
    parser.add_argument("--first-n", type=int, default=DEFAULT_FIRST_N, help="tickets of each writer but E (as tools/synth_labelled.py)")
    parser.add_argument("--writers", default=DEFAULT_WRITERS, help="writer letters (as tools/synth_labelled.py)")
    args = parser.parse_args(argv)

    wanted = [row["id"] for row in select(first_n=args.first_n, writers=args.writers)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = transcribed_ids(args.out)
    print(f"{len(wanted)} selected, {len(done & set(wanted))} already in {args.out}", flush=True)

    stop = threading.Event()

    def _stop(*_):
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    args.log_dir.mkdir(parents=True, exist_ok=True)
    triton = TritonProcess(args.repository, log_path=args.log_dir / "triton.log")
    gateway = None
    write_lock = threading.Lock()
    counts = {"ok": 0, "failed": 0, "audio_s": 0.0}
    started = time.monotonic()
    try:
        triton.start()
        print(f"triton ready at {triton.grpc_url}", flush=True)
        gateway = GatewayProcess(args.model_dir, triton.grpc_url, log_path=args.log_dir / "gateway.log")
        gateway.start(timeout_s=120.0)
        print(f"gateway SERVING at {gateway.address}", flush=True)

        channel = grpc.insecure_channel(gateway.address, options=[
            ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)])
        stub = asr_pb2_grpc.AsrStub(channel)

        def transcribe(ticket_id: str) -> None:
            path = args.audio / f"{ticket_id}.flac"
            request = asr_pb2.TranscribeRequest(
                audio_content=path.read_bytes(), language="zh", beam_size=args.beam_size,
                request_id=path.name, analyze=False)
            t0 = time.monotonic()
            try:
                response = stub.Transcribe(request, timeout=600.0)
            except grpc.RpcError as error:
                with write_lock:
                    counts["failed"] += 1
                print(f"{ticket_id}: error {error.code().name}: {error.details()}", flush=True)
                return
            row = {"id": ticket_id, "asr_text": response.text, "asr_model": ASR_MODEL,
                   "audio_s": round(float(response.audio_duration_s), 2)}
            with write_lock:
                with open(args.out, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                counts["ok"] += 1
                counts["audio_s"] += row["audio_s"]
                number = counts["ok"]
            print(f"[{number}] {ticket_id} {row['audio_s']:.1f} s in {time.monotonic() - t0:.1f} s: {response.text}", flush=True)

        pending: set = set()
        submitted = set(done)
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            while not stop.is_set():
                if args.deadline and time.time() > args.deadline:
                    print("deadline reached: submitting nothing more", flush=True)
                    break
                synth_running = _alive(args.synth_pid)
                ready = [i for i in wanted if i not in submitted and (args.audio / f"{i}.flac").exists()]
                while ready and len(pending) < args.concurrency:
                    ticket_id = ready.pop(0)
                    submitted.add(ticket_id)
                    pending.add(pool.submit(transcribe, ticket_id))
                remaining = [i for i in wanted if i not in submitted]
                if not remaining and not pending:
                    break
                if not ready and not pending and not synth_running:
                    print(f"synthesiser gone; {len(remaining)} tickets have no audio: {remaining}", flush=True)
                    break
                if pending:
                    finished, pending = wait(pending, timeout=args.poll_s if not ready else 1.0, return_when=FIRST_COMPLETED)
                    for future in finished:
                        future.result()
                else:
                    stop.wait(args.poll_s)
            # let the requests in flight finish (their results are kept)
            wait(pending)
        channel.close()
    finally:
        if gateway is not None:
            gateway.stop()
        triton.stop()
        print("stopped gateway and triton", flush=True)
    elapsed = time.monotonic() - started
    print(f"{counts['ok']} transcribed, {counts['failed']} failed, {counts['audio_s']:.0f} s of audio in {elapsed:.0f} s", flush=True)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
