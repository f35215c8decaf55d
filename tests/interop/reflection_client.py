"""A client in another language than the services: Python grpcio with grpcio-reflection.

For every service given as host:port, it lists the services through server reflection, fetches
each mall service's descriptor and prints its RPCs, and calls grpc.health.v1.Health/Check.
Exits non-zero when any of that fails.

    python3 -m venv .tools/pyclient && .tools/pyclient/bin/pip install grpcio grpcio-reflection grpcio-health-checking
    .tools/pyclient/bin/python tests/interop/reflection_client.py 127.0.0.1:50051 127.0.0.1:50052 ...
"""

import sys
import time

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


def check(target: str) -> None:
    channel = grpc.insecure_channel(target)
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    services = [s.name for s in response.list_services_response.service]
    print(f"{target}: {', '.join(services)}")
    for name in services:
        if not name.startswith("mall."):
            continue
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=name)
        (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        for raw in response.file_descriptor_response.file_descriptor_proto:
            file = descriptor_pb2.FileDescriptorProto.FromString(raw)
            for service in file.service:
                if f"{file.package}.{service.name}" == name:
                    print(f"  {name}: {', '.join(m.name for m in service.method)}")
    health = health_pb2_grpc.HealthStub(channel)
    # A server reports NOT_SERVING until its first readiness probe passed: poll briefly.
    deadline = time.monotonic() + 15
    while True:
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        if status == health_pb2.HealthCheckResponse.SERVING or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    print(f"  health: {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
    if status != health_pb2.HealthCheckResponse.SERVING:
        raise SystemExit(f"{target} is not SERVING")


if __name__ == "__main__":
    for target in sys.argv[1:]:
        check(target)
