"""Exit 0 when the gateway answers SERVING, 1 otherwise (docker/Kubernetes exec probe).

    python -m gateway.clients.healthcheck [HOST:PORT] [--service asr.v1.Asr]
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.clients.channel import ChannelSecurity, add_security_arguments, open_channel, security_from_args


def check(address: str, service: str = "", timeout_s: float = 3.0, security: ChannelSecurity | None = None) -> bool:
    """Health needs no API key; ``security`` gives the TLS settings of a TLS gateway."""
    with open_channel(address, security) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default="localhost:50051")
    parser.add_argument("--service", default="")
    parser.add_argument("--timeout", type=float, default=3.0)
    add_security_arguments(parser)
    args = parser.parse_args(argv)
    serving = check(args.address, args.service, args.timeout, security_from_args(args))
    print("SERVING" if serving else "NOT_SERVING")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
