"""python -m gateway.web [serve] --gateway HOST:PORT --users FILE  |  python -m gateway.web hash-password"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = PROJECT_ROOT / "var" / "web"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gateway.web", description="工单核对台 (the review workbench)")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the web app (default)")
    add_serve_arguments(serve)
    hashing = sub.add_parser("hash-password", help="print a scrypt hash for users.yaml (reads the password from the terminal or stdin)")
    hashing.add_argument("--stdin", action="store_true", help="read the password from standard input")
    return parser


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gateway", default="localhost:50051", help="gRPC address of the gateway")
    p.add_argument("--gateway-ca", type=Path, default=None, help="CA certificate: TLS to the gateway")
    p.add_argument("--gateway-client-cert", type=Path, default=None, help="with --gateway-ca: the workbench's certificate for a mutual-TLS gateway")
    p.add_argument("--gateway-client-key", type=Path, default=None)
    p.add_argument("--gateway-api-key-file", type=Path, default=None,
                   help="file holding the workbench's API key for a gateway run with --api-keys (or $WORKBENCH_GATEWAY_API_KEY)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--users", type=Path, default=DEFAULT_DATA_DIR / "users.yaml", help="users and roles (gateway/web/users.example.yaml)")
    p.add_argument("--history-db", type=Path, default=None, help="the ticket history the gateway writes (default: store.path of analysis/config/defaults.yaml)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="sessions, audit log, uploaded audio")
    p.add_argument("--max-upload-mb", type=float, default=50.0)
    p.add_argument("--session-minutes", type=float, default=480.0)
    p.add_argument("--tls-cert", type=Path, default=None, help="serve HTTPS with this certificate (PEM); cookies become Secure")
    p.add_argument("--tls-key", type=Path, default=None)
    p.add_argument("--secure-cookies", action="store_true", help="Secure cookies behind a TLS-terminating proxy")
    p.add_argument("--language", default="zh")
    p.add_argument("--log-level", default="info")


def serve(args) -> int:
    import uvicorn

    from gateway.web.app import WebConfig, create_app
    from gateway.web.auth import UsersConfigError

    history_db = args.history_db
    if history_db is None:
        from analysis.analyzer import load_config

        history_db = Path(load_config().defaults.store_path)
    if not history_db.is_absolute():
        history_db = PROJECT_ROOT / history_db
    if bool(args.tls_cert) != bool(args.tls_key):
        print("--tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if (args.gateway_client_cert or args.gateway_client_key) and not (args.gateway_client_cert and args.gateway_client_key and args.gateway_ca):
        print("--gateway-client-cert and --gateway-client-key go together, with --gateway-ca", file=sys.stderr)
        return 2
    api_key = args.gateway_api_key_file.read_text(encoding="utf-8").strip() if args.gateway_api_key_file else os.environ.get("WORKBENCH_GATEWAY_API_KEY")
    config = WebConfig(
        gateway=args.gateway, users_file=args.users, history_db=history_db, data_dir=args.data_dir,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), secure_cookies=bool(args.tls_cert) or args.secure_cookies,
        session_minutes=args.session_minutes, gateway_ca=args.gateway_ca, gateway_api_key=api_key or None,
        gateway_client_cert=args.gateway_client_cert, gateway_client_key=args.gateway_client_key, language=args.language,
    )
    try:
        app = create_app(config)
    except UsersConfigError as error:
        print(f"cannot start: {error}", file=sys.stderr)
        return 2
    scheme = "https" if args.tls_cert else "http"
    print(f"workbench at {scheme}://{args.host}:{args.port}/ (gateway {args.gateway}, history {history_db})", flush=True)
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level,
        ssl_certfile=str(args.tls_cert) if args.tls_cert else None, ssl_keyfile=str(args.tls_key) if args.tls_key else None,
        proxy_headers=False,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("serve", "hash-password", "-h", "--help"):
        argv = ["serve", *argv]
    args = build_parser().parse_args(argv)
    if args.command == "hash-password":
        from gateway.web.auth import hash_password

        password = sys.stdin.readline().rstrip("\n") if args.stdin else getpass.getpass("密码: ")
        if len(password) < 8:
            print("password too short (at least 8 characters)", file=sys.stderr)
            return 2
        print(hash_password(password))
        return 0
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
