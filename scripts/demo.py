"""`make demo`: train a model on two workers, register it, promote it, and predict through the gateway.

Runs against the local mesh of `make up` (the gateway on 127.0.0.1:8080) using only the public API.
"""

import argparse
import sys
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import yaml
from google.protobuf import json_format

from modelgrid.client.registry import RegistryClient
from modelgrid.client.tensors import array_to_tensor, tensor_to_array
from modelgrid.common.v1 import common_pb2
from modelgrid.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from modelgrid.registry.v1 import registry_pb2, registry_pb2_grpc
from modelgrid.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.cli.channels import open_channel

REPO = Path(__file__).resolve().parents[1]
FINAL = {trainer_pb2.JOB_STATE_SUCCEEDED, trainer_pb2.JOB_STATE_FAILED, trainer_pb2.JOB_STATE_CANCELLED}


def job_spec(channel: grpc.Channel, path: Path, model: str) -> trainer_pb2.JobSpec:
    """The example spec, registering into `model` as its "candidate" (the demo promotes it). Its data set, a file
    of ours, goes to the registry as a blob first (the trainer reads no path of ours), as `modelgrid jobs submit`
    does."""
    raw = yaml.safe_load(path.read_text())
    data = path.parent / raw["dataset"].pop("local_path")
    raw["dataset"]["blob_digest"] = RegistryClient(channel).upload_blob(data).digest
    raw["register_model"], raw["register_aliases"] = model, ["candidate"]
    return json_format.ParseDict(raw, trainer_pb2.JobSpec())


def train(channel: grpc.Channel, spec: trainer_pb2.JobSpec) -> trainer_pb2.Job:
    trainer = trainer_pb2_grpc.TrainerStub(channel)
    job = trainer.SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec, request_id=f"demo-{uuid.uuid4().hex[:8]}"))
    print(f"1. submitted job {job.id}: {spec.recipe} on {spec.workers} workers")
    for event in trainer.WatchJob(trainer_pb2.WatchJobRequest(id=job.id)):
        state = trainer_pb2.JobState.Name(event.state).removeprefix("JOB_STATE_")
        if event.type == trainer_pb2.JOB_EVENT_TYPE_EPOCH:
            print(
                f"   epoch {event.epoch}: loss {event.metrics['loss']:.3f}, "
                f"val_accuracy {event.metrics.get('val_accuracy', 0):.3f}"
            )
        elif event.type != trainer_pb2.JOB_EVENT_TYPE_STEP:
            print(f"   {state}: {event.message}")
    job = trainer.GetJob(trainer_pb2.GetJobRequest(id=job.id))
    if job.state != trainer_pb2.JOB_STATE_SUCCEEDED:
        sys.exit(f"the job ended {trainer_pb2.JobState.Name(job.state)}: {job.failure.reason}")
    return job


def promote(channel: grpc.Channel, model: str, version: int) -> None:
    registry = registry_pb2_grpc.ModelRegistryStub(channel)
    current = registry.GetModel(registry_pb2.GetModelRequest(name=model)).aliases.get("production", 0)
    registry.SetAlias(
        registry_pb2.SetAliasRequest(model_name=model, alias="production", version=version, expected_version=current)
    )
    print(f"2. promoted {model}:{version} to production (it was {current or 'unset'})")


def predict(channel: grpc.Channel, model: str, version: int, timeout: float = 120) -> None:
    predictor = predictor_pb2_grpc.PredictorStub(channel)
    with np.load(REPO / "data" / "digits" / "digits.npz") as data:
        x, y = data["x"][:200].astype(np.float32), data["y"][:200]
    request = predictor_pb2.PredictRequest(
        model=common_pb2.ModelRef(name=model, alias="production"), inputs={"x": array_to_tensor(x)}
    )
    deadline = time.monotonic() + timeout
    while True:  # the predictors load the promoted version when the alias moves
        try:
            reply = predictor.Predict(request, timeout=30)
            if reply.version == version:
                break
        except grpc.RpcError as err:
            if err.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                raise
        if time.monotonic() > deadline:
            sys.exit("the predictors did not serve the promoted version in time")
        time.sleep(0.5)
    accuracy = float(np.mean(np.argmax(tensor_to_array(reply.outputs["probabilities"]), axis=1) == y))
    print(
        f"3. predicted 200 digits through the gateway with {model}@production (version {reply.version}): "
        f"accuracy {accuracy:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", default="127.0.0.1:8080")
    parser.add_argument("--spec", type=Path, default=REPO / "examples" / "digits-mlp.yaml")
    parser.add_argument("--model", default="digits")
    args = parser.parse_args()
    with open_channel(args.gateway, []) as channel:  # with the local gateway's admin key (made by `make up`)
        job = train(channel, job_spec(channel, args.spec, args.model))
        promote(channel, args.model, job.registered_version)
        predict(channel, args.model, job.registered_version)


if __name__ == "__main__":
    main()
