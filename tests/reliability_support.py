"""Helpers shared by the reliability, security and fuzz tests: raw stubs, health checks, worker facts."""
from __future__ import annotations

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmscope.proto.wire import lmscope_pb2 as pb
from lmscope.proto.wire import lmscope_pb2_grpc as pb_grpc
from lmscope.service import procinfo

PROMPT = "The capital of France is"
CRASH_METADATA = "lmscope-test-crash"


def stub(address: str, channel: grpc.Channel | None = None) -> pb_grpc.InspectorStub:
    return pb_grpc.InspectorStub(channel or grpc.insecure_channel(address))


def health(address: str, channel: grpc.Channel | None = None, timeout: float = 10.0) -> int:
    """The server's overall health status (health_pb2.HealthCheckResponse.SERVING == 1)."""
    health_stub = health_pb2_grpc.HealthStub(channel or grpc.insecure_channel(address))
    return health_stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def crash_run(address: str, how: str, timeout: float = 60.0) -> grpc.RpcError:
    """A Run whose worker dies on purpose (test hook); returns the error the client got."""
    request = pb.RunRequest(prompts=[pb.Prompt(text=PROMPT)])
    try:
        list(stub(address).Run(request, metadata=((CRASH_METADATA, how),), timeout=timeout))
    except grpc.RpcError as error:
        return error
    raise AssertionError("the crash request succeeded")


def only_worker(server) -> int:
    pids = procinfo.worker_pids(server.process.pid)
    assert len(pids) == 1, pids
    return pids[0]


def as_arrays(run) -> dict[str, np.ndarray]:
    """Everything a Run returned, by name, for exact comparisons."""
    out = {f"capture:{k}": v for k, v in run.captures.items()}
    out.update({f"extra:{k}": v for k, v in run.extra.items()})
    if run.logits is not None:
        out["logits"] = run.logits
    return out
