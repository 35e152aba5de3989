"""`make demo`: train a model on two workers, register it, promote it, and predict through the gateway.

Runs against the local mesh of `make up` (the gateway on 127.0.0.1:8080) with the client library alone
(modelgrid.client, clients/python): what an application that installed modelgrid-client does.
"""

import argparse
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import yaml

from modelgrid.client import PredictorClient, RegistryClient, TrainerClient, connect
from modelgrid.client.errors import NotFound, Unavailable
from modelgrid.trainer.v1 import trainer_pb2
from services.cli.channels import local_admin_key

REPO = Path(__file__).resolve().parents[1]


def job_spec(registry: RegistryClient, path: Path, model: str) -> dict:
    """The example spec, registering into `model` as its "candidate" (the demo promotes it). Its data set, a file
    of ours, goes to the registry as a blob first (the trainer reads no path of ours), as `modelgrid jobs submit`
    does."""
    raw = yaml.safe_load(path.read_text())
    data = path.parent / raw["dataset"].pop("local_path")
    raw["dataset"]["blob_digest"] = registry.upload_blob(data).digest
    raw["register_model"], raw["register_aliases"] = model, ["candidate"]
    return raw


def train(trainer: TrainerClient, spec: dict) -> trainer_pb2.Job:
    job = trainer.submit(spec, request_id=f"demo-{uuid.uuid4().hex[:8]}")
    print(f"1. submitted job {job.id}: {spec['recipe']} on {spec.get('workers', 1)} workers")
    for event in trainer.watch(job.id):
        state = trainer_pb2.JobState.Name(event.state).removeprefix("JOB_STATE_")
        if event.type == trainer_pb2.JOB_EVENT_TYPE_EPOCH:
            print(
                f"   epoch {event.epoch}: loss {event.metrics['loss']:.3f}, "
                f"val_accuracy {event.metrics.get('val_accuracy', 0):.3f}"
            )
        elif event.type != trainer_pb2.JOB_EVENT_TYPE_STEP:
            print(f"   {state}: {event.message}")
    job = trainer.job(job.id)
    if job.state != trainer_pb2.JOB_STATE_SUCCEEDED:
        sys.exit(f"the job ended {trainer_pb2.JobState.Name(job.state)}: {job.failure.reason}")
    return job


def promote(registry: RegistryClient, model: str, version: int) -> None:
    current = registry.get_model(model).aliases.get("production", 0)
    registry.set_alias(model, "production", version, expected_version=current)
    print(f"2. promoted {model}:{version} to production (it was {current or 'unset'})")


def predict(predictor: PredictorClient, model: str, version: int, timeout: float = 120) -> None:
    with np.load(REPO / "data" / "digits" / "digits.npz") as data:
        x, y = data["x"][:200].astype(np.float32), data["y"][:200]
    deadline = time.monotonic() + timeout
    while True:  # the predictors load the promoted version when the alias moves
        try:
            answer = predictor.predict(f"{model}@production", {"x": x})
            if answer.version == version:
                break
        except (NotFound, Unavailable):
            pass
        if time.monotonic() > deadline:
            sys.exit("the predictors did not serve the promoted version in time")
        time.sleep(0.5)
    accuracy = float(np.mean(np.argmax(answer.outputs["probabilities"], axis=1) == y))
    print(
        f"3. predicted 200 digits through the gateway with {model}@production (version {answer.version}): "
        f"accuracy {accuracy:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", default="127.0.0.1:8080")
    parser.add_argument("--spec", type=Path, default=REPO / "examples" / "digits-mlp.yaml")
    parser.add_argument("--model", default="digits")
    args = parser.parse_args()
    # The local gateway's admin key (made by `make up`); a gateway elsewhere gets none.
    with connect(args.gateway, api_key=local_admin_key(args.gateway)) as channel:
        registry = RegistryClient(channel)
        job = train(TrainerClient(channel, timeout=60), job_spec(registry, args.spec, args.model))
        promote(registry, args.model, job.registered_version)
        predict(PredictorClient(channel), args.model, job.registered_version)


if __name__ == "__main__":
    main()
