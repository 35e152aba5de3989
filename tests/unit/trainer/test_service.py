"""The trainer service as `main()` builds it, in process on port 0, over a real channel: one job on one real
TensorFlow worker (started by an in-process agent) trains on the digits, is registered in an in-process registry,
and answers through the public API; bad requests get their status codes on the wire."""

import asyncio
import sys

import grpc
import pytest

from modelgrid.trainer.v1 import trainer_pb2 as pb
from modelgrid.trainer.v1 import trainer_pb2_grpc
from services.trainer.main import start_trainer

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_real_worker_trains_registers_and_the_api_reports_it(
    agents, consul, registry, registry_client, trainer_settings, digits_spec, unique
):
    await agents(slots=1, worker=[sys.executable, "-m", "services.trainer.worker"])
    settings = trainer_settings.model_copy(
        update={"consul_url": consul.http_url, "registry_target": f"127.0.0.1:{registry.port}"}
    )
    trainer = await start_trainer(settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{trainer.port}")
    stub = trainer_pb2_grpc.TrainerStub(channel)
    try:
        for _ in range(200):
            if (await stub.ListWorkers(pb.ListWorkersRequest(), timeout=10)).workers:
                break
            await asyncio.sleep(0.1)
        model = unique("digits")
        hyper_parameters = pb.HyperParameters(epochs=1, batch_size=64, learning_rate=0.01, seed=1)
        spec = digits_spec(
            workers=1, hyper_parameters=hyper_parameters, register_model=model, register_aliases=["production"]
        )
        job = await stub.SubmitJob(pb.SubmitJobRequest(spec=spec, request_id=unique("req")), timeout=30)
        assert job.state == pb.JOB_STATE_PENDING and job.spec == spec

        events = [event async for event in stub.WatchJob(pb.WatchJobRequest(id=job.id), timeout=120)]
        done = await stub.GetJob(pb.GetJobRequest(id=job.id), timeout=10)
        logs = await stub.GetJobLogs(pb.GetJobLogsRequest(id=job.id, task_index=-1), timeout=10)
        assert done.state == pb.JOB_STATE_SUCCEEDED, (done, logs)
        assert done.spec == spec, "the job returns its spec as submitted"
        assert [e.type for e in events].count(pb.JOB_EVENT_TYPE_EPOCH) == 1
        assert events[-1].state == pb.JOB_STATE_SUCCEEDED
        assert done.metrics["val_accuracy"] > 0.5 and 0 < done.step <= done.metrics["steps"]
        version = await registry_client.resolve(f"{model}@production")
        assert version.version == done.registered_version
        assert version.lineage.training_job_id == job.id and version.lineage.dataset_digest == done.dataset_digest
        assert [s.name for s in version.signatures] == ["serving_default"]
        (log,) = logs.logs
        assert log.task_index == 0 and log.lines

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SubmitJob(pb.SubmitJobRequest(spec=digits_spec(workers=0)), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "workers" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CancelJob(pb.CancelJobRequest(id="nope"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CancelJob(pb.CancelJobRequest(id=job.id), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        await channel.close()
        await trainer.stop()
