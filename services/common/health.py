"""Waiting for a gRPC server to report SERVING on the standard health service."""

import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from trainer_client.tls import ClientTLS, open_channel


def wait_until_serving(address: str, timeout_s: float, poll_s: float,
                       still_starting: Callable[[], bool] = lambda: True,
                       tls: ClientTLS | None = None) -> bool:
    """True once `address` reports SERVING (asked over TLS when tls is given); False after
    timeout_s, or as soon as still_starting() says the server's process is gone."""
    deadline = time.monotonic() + timeout_s
    with open_channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and still_starting():
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(),
                                   timeout=max(deadline - time.monotonic(), poll_s))
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(poll_s)
    return False
