"""Recipes as registry artifacts, in process: the registry checks a recipe model's versions and keeps its kind tag
fixed; the trainer fetches `registry:<name>/<version>` at submit, verifies its digest, ships its source to the
workers like a file recipe and records the digest in the trained version's lineage; the gateway lets only ADMIN
register one. (The stand-in worker of conftest runs the job: the real workers are in
tests/integration/test_recipes.py.)"""

import asyncio
import hashlib
import uuid
from pathlib import Path

import grpc
import pytest

from modelgrid.client.errors import FailedPrecondition, InvalidArgument, NotFound
from modelgrid.client.registry import ArtifactFormat, AsyncRegistryClient
from modelgrid.client.registry.types import KIND_TAG, RECIPE_KIND
from modelgrid.registry.v1 import registry_pb2 as pb
from modelgrid.registry.v1 import registry_pb2_grpc
from services.gateway.auth import Scope, scopes_needed
from services.registry.recipes import check_recipe_source
from services.trainer import registry_recipes
from services.trainer.domain import EventType, JobState
from services.trainer.jobspec import Dataset, HyperParameters, JobSpec
from services.trainer.specs import worker_spec

in_session_loop = pytest.mark.asyncio(loop_scope="session")

# Takes any recipe_params: the stand-in worker reads its instructions from them (conftest).
RECIPE = 'TASK = "regression"\n\ndef build_model(input_shape, num_outputs, **params):\n    raise NotImplementedError\n'


async def register(registry, client: AsyncRegistryClient, tmp_path: Path, name: str, source: str, kind=RECIPE_KIND):
    """CreateModel (tagged a recipe unless kind is None) and one version of `source`; the version's number."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{registry.port}") as channel:
        stub = registry_pb2_grpc.ModelRegistryStub(channel)
        tags = {KIND_TAG: kind} if kind else {}
        try:
            await stub.CreateModel(pb.CreateModelRequest(name=name, tags=tags))
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    path = tmp_path / f"{uuid.uuid4().hex}.py"
    path.write_text(source)
    blob = await client.upload_blob(path)
    version = await client.create_version_from_blob(
        name, blob.digest, request_id=uuid.uuid4().hex, artifact_format=ArtifactFormat.RAW
    )
    return version.version


def spec(recipe: str, digits_npz: Path, **fields) -> JobSpec:
    values = {
        "name": "recipe",
        "recipe": recipe,
        "recipe_params": {"steps_per_epoch": 2},
        "dataset": Dataset(format="npz", local_path=str(digits_npz)),
        "hyper_parameters": HyperParameters(epochs=1),
        "workers": 1,
        **fields,
    }
    return JobSpec(**values)


def test_the_registry_checks_a_recipe_source(tmp_path):
    ok = tmp_path / "ok.py"
    ok.write_text(RECIPE)
    assert check_recipe_source(ok, 1024) == []
    with pytest.raises(InvalidArgument, match="at most 10 bytes .*MODELGRID_REGISTRY_MAX_RECIPE_BYTES"):
        check_recipe_source(ok, 10)
    for source, message in [
        (b"def build_model(:\n", "not valid Python"),
        (b"x = '\x00'\n\x00", "not valid Python"),
        (b"\xff\xfe", "UTF-8"),
        (b"class build_model:\n    pass\n", "no top-level function build_model"),
        (b"if True:\n    def build_model(a, b):\n        pass\n", "no top-level function build_model"),
        (b"x = " + b"-" * 200_000 + b"1\n", "nested too deeply"),
    ]:
        bad = tmp_path / "bad.py"
        bad.write_bytes(source)
        with pytest.raises(InvalidArgument, match=message) as err:
            check_recipe_source(bad, 300_000)
        assert "build_model(:" not in str(err.value)  # the error names the check, not the content


@in_session_loop
async def test_the_registry_keeps_recipe_models_recipes_and_their_versions_sound(registry, registry_client, tmp_path):
    name = f"recipe-{uuid.uuid4().hex[:6]}"
    assert await register(registry, registry_client, tmp_path, name, RECIPE) == 1
    with pytest.raises(InvalidArgument, match="no top-level function build_model"):
        await register(registry, registry_client, tmp_path, name, "def train():\n    pass\n")
    with pytest.raises(InvalidArgument, match="not valid Python"):
        await register(registry, registry_client, tmp_path, name, "def build_model(:\n")
    model = await registry_client.get_model(name)
    assert model.latest_version == 1  # the refused versions took no number
    async with grpc.aio.insecure_channel(f"127.0.0.1:{registry.port}") as channel:
        stub = registry_pb2_grpc.ModelRegistryStub(channel)
        for change in (
            pb.UpdateModelRequest(name=name, remove_tags=[KIND_TAG]),
            pb.UpdateModelRequest(name=name, set_tags={KIND_TAG: "model"}),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.UpdateModel(change)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateModel(pb.CreateModelRequest(name=f"{name}-x", tags={KIND_TAG: "plugin"}))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # A recipe's version is source, not a SavedModel.
        blob = await registry_client.upload_blob(tmp_path / next(p.name for p in tmp_path.glob("*.py")))
        with pytest.raises(InvalidArgument, match="format must be RAW"):
            await registry_client.create_version_from_blob(name, blob.digest, request_id=uuid.uuid4().hex)


@in_session_loop
async def test_a_job_trains_with_a_registry_recipe_and_its_version_records_the_digest(
    agents, agent_client, cores, digits_npz, registry, registry_client, trainer_settings, tmp_path
):
    await agents(slots=1)
    name = f"recipe-{uuid.uuid4().hex[:6]}"
    await register(registry, registry_client, tmp_path, name, RECIPE)
    digest = hashlib.sha256(RECIPE.encode()).hexdigest()
    core = await cores()
    model = f"trained-{uuid.uuid4().hex[:6]}"

    job = await core.submit(spec(f"registry:{name}/1", digits_npz, register_model=model), "")
    assert job.recipe_digest == digest
    shipped = worker_spec(job, trainer_settings)  # what every replica's agent gets: the source, as a file recipe
    assert shipped.recipe == f"file:registry/{name}/1.py" and shipped.recipe_source == RECIPE

    for _ in range(300):
        job = await core.get(job.id)
        if job.state in (JobState.SUCCEEDED, JobState.FAILED):
            break
        await asyncio.sleep(0.1)
    assert job.state == JobState.SUCCEEDED, job
    version = await registry_client.resolve(f"{model}:{job.registered_version}")
    assert version.params["recipe"] == f"registry:{name}/1" and version.params["recipe_digest"] == digest
    assert f"recipe registry:{name}/1 sha256:{digest}" in version.lineage.source
    events = [e async for e in core.watch(job.id, "")]
    assert any(e.type == EventType.REGISTERED for e in events)


@in_session_loop
async def test_a_bad_registry_recipe_queues_nothing(
    agents, agent_client, cores, digits_npz, registry, registry_client, trainer_settings, tmp_path
):
    core = await cores()
    plain = f"plain-{uuid.uuid4().hex[:6]}"
    await register(registry, registry_client, tmp_path, plain, RECIPE, kind=None)  # a model, not a recipe
    name = f"recipe-{uuid.uuid4().hex[:6]}"
    await register(registry, registry_client, tmp_path, name, RECIPE.replace("**params", "units=4"))
    cases = [
        (f"registry:{name}", InvalidArgument, "must be registry:<name>/<version>"),
        (f"registry:{name}/7", NotFound, f"registry has no model '{name}' with a READY version 7"),
        (f"registry:missing-{name}/1", NotFound, "registry has no model"),
        (f"registry:{plain}/1", FailedPrecondition, f"model '{plain}' is not a recipe"),
        (f"registry:{name}/1", InvalidArgument, r"takes no parameter\(s\) \['steps_per_epoch'\]"),
    ]
    for recipe, error, message in cases:
        with pytest.raises(error, match=message):
            await core.submit(spec(recipe, digits_npz), "")
    trainer_settings.max_recipe_bytes = 16
    with pytest.raises(FailedPrecondition, match="over the trainer's limit of 16 .*MAX_RECIPE_BYTES"):
        await core.submit(spec(f"registry:{name}/1", digits_npz, recipe_params={"units": 2}), "")
    jobs, _ = await core.list_jobs(None, 100, "")
    assert not [j for j in jobs if j.spec.recipe.startswith("registry:")]


@in_session_loop
async def test_a_recipe_copy_that_changed_in_the_trainers_scratch_is_refused(
    agents, agent_client, cores, digits_npz, registry, registry_client, trainer_settings, tmp_path
):
    name = f"recipe-{uuid.uuid4().hex[:6]}"
    await register(registry, registry_client, tmp_path, name, RECIPE)
    fetched = await registry_recipes.fetch_recipe(f"registry:{name}/1", registry_client, trainer_settings)
    copy = trainer_settings.scratch_dir.resolve() / "recipes" / f"{fetched.digest}.py"
    assert copy.read_text() == RECIPE
    copy.write_text(RECIPE + "import os\n")
    with pytest.raises(InvalidArgument, match="no longer matches its digest"):
        registry_recipes.cached_recipe(f"registry:{name}/1", fetched.digest, trainer_settings)
    again = await registry_recipes.fetch_recipe(f"registry:{name}/1", registry_client, trainer_settings)
    assert again.source == RECIPE and copy.read_text() == RECIPE  # fetched again, verified


def test_only_admin_registers_models_and_recipes_through_the_gateway():
    for method in ("CreateModel", "CreateVersion", "UpdateModel"):
        assert scopes_needed(f"/modelgrid.registry.v1.ModelRegistry/{method}") == {Scope.ADMIN}
    # A TRAIN key uploads blobs (data sets) and submits jobs, and reads recipes, but cannot make a blob a recipe.
    assert Scope.TRAIN in scopes_needed("/modelgrid.registry.v1.ModelRegistry/UploadBlob")
    assert Scope.TRAIN in scopes_needed("/modelgrid.registry.v1.ModelRegistry/DownloadArtifact")
    assert Scope.TRAIN in scopes_needed("/modelgrid.trainer.v1.Trainer/SubmitJob")
