"""Training recipes from the registry end to end: an ADMIN registers the shipped regression recipe (with the CLI's
`recipes register` code) in a real registry, a real trainer fetches it for the shipped example job
(examples/regression-mlp.yaml, on data/regression) and two real TensorFlow workers train it; the trained version's
lineage holds the recipe's digest and its metrics are regression metrics. Through a real gateway with API keys, a
TRAIN key cannot register a recipe."""

import hashlib
import time
import uuid
from types import SimpleNamespace

import grpc
import pytest

from modelgrid.gateway.v1 import gateway_pb2 as gpb
from modelgrid.gateway.v1 import gateway_pb2_grpc
from modelgrid.registry.v1 import registry_pb2 as rpb
from modelgrid.registry.v1 import registry_pb2_grpc
from modelgrid.trainer.v1 import trainer_pb2 as pb
from modelgrid.trainer.v1 import trainer_pb2_grpc
from services.cli import recipe_commands
from services.cli.output import Output
from services.cli.registry_commands import RegistrySession
from services.cli.trainer_commands import load_spec
from services.kit.localinfra import ConsulAgent
from services.kit.processes import REPO_ROOT

pytestmark = pytest.mark.slow

REGRESSION_NPZ = REPO_ROOT / "data" / "regression" / "regression.npz"
RECIPE = REPO_ROOT / "examples" / "recipes" / "regression_mlp.py"
EXAMPLE_JOB = REPO_ROOT / "examples" / "regression-mlp.yaml"
ADMIN_KEY = "admin-secret-for-recipe-tests"
FINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}


@pytest.fixture(scope="module")
def mesh(internal_tls_dir, redis_server, tmp_path_factory, launch, client_for, until_routed):
    tmp = tmp_path_factory.mktemp("recipes")
    with ConsulAgent(tmp / "consul", tls_dir=internal_tls_dir) as consul:
        prefix = f"mg:test-recipes:{uuid.uuid4().hex[:6]}:"
        gateway_keys = f"mg:test-recipes-gw:{uuid.uuid4().hex[:6]}:"
        with launch.together():
            registry = launch.registry(consul.http_url, redis_server.url, tmp / "reg")
            agents = [launch.agent(consul.http_url, tmp) for _ in range(2)]
            trainer = launch.trainer(consul.http_url, redis_server.url, tmp, prefix)
            gateway = launch.gateway(
                consul.http_url, redis_server.url, tmp, AUTH_ENABLED="true", ADMIN_KEY=ADMIN_KEY,
                REDIS_KEY_PREFIX=gateway_keys,
            )  # fmt: skip
        registry_channel, registry_client = client_for(registry)
        trainer_channel = trainer.channel()
        gateway_channel = grpc.insecure_channel(gateway.target)
        ns = SimpleNamespace(
            registry_client=registry_client,
            trainer=trainer_pb2_grpc.TrainerStub(trainer_channel),
            gateway_channel=gateway_channel,
        )
        deadline = time.monotonic() + 30
        while len(ns.trainer.ListWorkers(pb.ListWorkersRequest()).workers) < 2:
            assert time.monotonic() < deadline, "the trainer did not find both agents"
            time.sleep(0.2)
        through_gateway = registry_pb2_grpc.ModelRegistryStub(gateway_channel)
        bearer = (("authorization", f"Bearer {ADMIN_KEY}"),)
        absent = rpb.GetModelRequest(name="absent")
        code = until_routed(lambda: through_gateway.GetModel(absent, metadata=bearer, timeout=10), "the registry")
        assert code == grpc.StatusCode.NOT_FOUND, code
        try:
            yield ns
        finally:
            for channel in (registry_channel, trainer_channel, gateway_channel):
                channel.close()
            gateway.stop()
            trainer.stop()
            for agent in agents:
                agent.stop()
            registry.stop()


def _register_with_the_cli(mesh, name: str, capsys) -> str:
    session = RegistrySession(mesh.registry_client, (), 30.0, Output(json_mode=False))
    args = SimpleNamespace(name=name, path=str(RECIPE), description="regression MLP")
    recipe_commands.register(session, args)
    printed = capsys.readouterr().out
    assert f"recipe: registry:{name}/1" in printed, printed
    recipe_commands.list_recipes(session, SimpleNamespace())
    assert f"registry:{name}/1" in capsys.readouterr().out  # the latest version, as a job names it
    return printed


def _submit(mesh, spec: pb.JobSpec) -> pb.Job:
    """SubmitJob, tried again (the same request id) while the trainer has not yet seen the new registry's health
    check pass in Consul."""
    request = pb.SubmitJobRequest(spec=spec, request_id=uuid.uuid4().hex)
    deadline = time.monotonic() + 30
    while True:
        try:
            return mesh.trainer.SubmitJob(request, timeout=30)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_a_registry_recipe_trains_a_regression_model_whose_lineage_holds_its_digest(mesh, capsys):
    name = f"regression-mlp-{uuid.uuid4().hex[:6]}"
    printed = _register_with_the_cli(mesh, name, capsys)
    digest = hashlib.sha256(RECIPE.read_bytes()).hexdigest()
    assert digest in printed

    # The shipped example job, as `modelgrid jobs submit` reads and sends it (its data set uploaded as a blob),
    # shortened, naming this test's recipe and model.
    spec, upload = load_spec(EXAMPLE_JOB)
    assert spec.recipe == "registry:regression-mlp/1" and upload == REGRESSION_NPZ
    spec.dataset.blob_digest = mesh.registry_client.upload_blob(upload).digest
    model = f"regression-{uuid.uuid4().hex[:6]}"
    spec.recipe, spec.register_model, spec.hyper_parameters.epochs = f"registry:{name}/1", model, 3
    spec.recipe_params.update({"hidden_units": [16]})
    job = _submit(mesh, spec)
    for _ in mesh.trainer.WatchJob(pb.WatchJobRequest(id=job.id), timeout=240):
        pass
    done = mesh.trainer.GetJob(pb.GetJobRequest(id=job.id))
    assert done.state == pb.JOB_STATE_SUCCEEDED, done

    version = mesh.registry_client.stub.GetVersion(
        rpb.GetVersionRequest(model_name=model, version=done.registered_version)
    )
    assert f"recipe registry:{name}/1 sha256:{digest}" in version.lineage.source
    assert version.params["recipe_digest"] == digest and version.params["recipe"] == f"registry:{name}/1"
    assert {"mse", "mae", "rmse", "val_mse", "val_mae", "val_rmse"} <= set(version.metrics), version.metrics
    assert "accuracy" not in version.metrics and "val_accuracy" not in version.metrics
    assert 0 < version.metrics["val_mae"] < 2.0, version.metrics  # the targets spread over about +-6
    assert done.metrics["val_mae"] == pytest.approx(version.metrics["val_mae"])
    assert [s.outputs[0].name for s in version.signatures if s.name == "serving_default"] == ["predictions"]

    # A job naming a version that does not exist, or a model that is no recipe, is refused at submit.
    for recipe, code in ((f"registry:{name}/9", grpc.StatusCode.NOT_FOUND), (f"registry:{model}/1", None)):
        spec.recipe = recipe
        with pytest.raises(grpc.RpcError) as err:
            mesh.trainer.SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=30)
        assert err.value.code() == (code or grpc.StatusCode.FAILED_PRECONDITION), err.value.details()


def test_only_an_admin_key_registers_a_recipe_through_the_gateway(mesh):
    admin = gateway_pb2_grpc.GatewayAdminStub(mesh.gateway_channel)
    bearer = (("authorization", f"Bearer {ADMIN_KEY}"),)
    trainer_key = admin.CreateApiKey(gpb.CreateApiKeyRequest(name="ci", scopes=[gpb.SCOPE_TRAIN]), metadata=bearer)
    as_trainer = (("authorization", f"Bearer {trainer_key.secret}"),)
    registry = registry_pb2_grpc.ModelRegistryStub(mesh.gateway_channel)
    name = f"recipe-{uuid.uuid4().hex[:6]}"
    create = rpb.CreateModelRequest(name=name, tags={"modelgrid.kind": "recipe"})

    with pytest.raises(grpc.RpcError) as err:
        registry.CreateModel(create, metadata=as_trainer, timeout=30)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
    meta = rpb.VersionMetadata(model_name=name, artifact_digest="0" * 64, from_blob=True)
    with pytest.raises(grpc.RpcError) as err:
        registry.CreateVersion(iter([rpb.CreateVersionRequest(metadata=meta)]), metadata=as_trainer, timeout=30)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
    with pytest.raises(grpc.RpcError):
        registry.GetModel(rpb.GetModelRequest(name=name), metadata=as_trainer, timeout=30)  # nothing was created

    created = registry.CreateModel(create, metadata=bearer, timeout=30)  # the ADMIN key may
    assert created.tags["modelgrid.kind"] == "recipe"
