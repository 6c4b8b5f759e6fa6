"""Builders and assertions shared by the tests."""

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from epochlens.v1 import common_pb2, writer_pb2


def item(step: int, sample_index: int, epoch: int = 1, **overrides) -> common_pb2.PredictionInput:
    fields = {"epoch": epoch, "step": step, "sample_index": sample_index,
              "prompt": f"prompt {sample_index}", "ground_truth": f"truth {sample_index}",
              "prediction": f"prediction {step}/{sample_index}", "generation_time_ms": 1.5}
    fields.update(overrides)
    return common_pb2.PredictionInput(**fields)


def grid(epochs: int, samples: int, steps_per_epoch: int = 10) -> list[common_pb2.PredictionInput]:
    """One prediction per (epoch, sample), at step epoch * steps_per_epoch."""
    return [item(e * steps_per_epoch, s, epoch=e) for e in range(1, epochs + 1)
            for s in range(samples)]


async def create_run(stub, metadata, name: str = "run", **fields) -> common_pb2.Run:
    fields = {"model_name": "tiny", "dataset_name": "toy", **fields}
    return await stub.CreateRun(writer_pb2.CreateRunRequest(name=name, **fields),
                                metadata=metadata)


def rich_status(exc: grpc.aio.AioRpcError) -> status_pb2.Status:
    status = rpc_status.from_call(exc)
    assert status is not None, f"no rich status on {exc.code()}: {exc.details()}"
    return status


def field_violations(status: status_pb2.Status) -> dict[str, str]:
    """field -> description from the status's google.rpc.BadRequest detail."""
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return {v.field: v.description for v in bad.field_violations}
    raise AssertionError(f"no BadRequest detail in {status}")


def error_reason(status: status_pb2.Status) -> str:
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    raise AssertionError(f"no ErrorInfo detail in {status}")
