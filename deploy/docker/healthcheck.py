#!/usr/bin/env python3
"""Container HEALTHCHECK: exit 0 iff the server's grpc.health.v1 Check reports SERVING.

Usage: sensepack-healthcheck [HOST:PORT] [SERVICE]
  HOST:PORT defaults to 127.0.0.1:$SENSEPACK_GRPC_PORT (8033); SERVICE defaults to "" (the whole server).
Plaintext only (a TLS deployment should probe with its own client or rely on the orchestrator).
"""
import os
import sys


def main(argv: list[str]) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = argv[1] if len(argv) > 1 else f"127.0.0.1:{os.environ.get('SENSEPACK_GRPC_PORT', '8033')}"
    service = argv[2] if len(argv) > 2 else ""
    timeout = float(os.environ.get("SENSEPACK_HEALTHCHECK_TIMEOUT", "4"))
    try:
        with grpc.insecure_channel(target) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                        timeout=timeout)
    except grpc.RpcError as e:
        print(f"unhealthy: {target}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {target}: {status}", file=sys.stderr)
        return 1
    print(f"healthy: {target}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
