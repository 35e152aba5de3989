"""The client library (clients/python, `modelgrid.client`) against a real mesh of this module's own: a registry, a
predictor, a trainer (no worker agents: jobs wait for slots) and two gateways with API keys on, one plaintext and
one whose public port has a certificate from a CA this module makes; its own Consul agent, the session's Redis.

- The README's examples (clients/python/README.md) run unchanged in a new virtualenv of the oldest Python the
  library supports that this machine has (3.10 when pyenv or the system has it), with the library installed from
  the repository as a user would: no TensorFlow arrives.
- Each client, blocking and asyncio, through the gateway: answers compared with what TensorFlow computes in this
  process, batch jobs to their results, training jobs submitted, found, listed and cancelled; keys, scopes, TLS;
  errors as the library's types with the server's message. The Open Inference Protocol's clients run only in the
  README's examples: this process's other test modules load tritonclient.grpc, whose messages are the same
  protobuf symbols (one process can hold only one of the two).
"""

import asyncio
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from modelgrid.client import (
    AsyncPredictorClient,
    AsyncRegistryClient,
    AsyncTrainerClient,
    PredictorClient,
    RegistryClient,
    TrainerClient,
    aio_connect,
    connect,
)
from modelgrid.client.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated, Unavailable
from modelgrid.gateway.v1 import gateway_pb2 as gpb
from modelgrid.gateway.v1 import gateway_pb2_grpc
from modelgrid.predictor.v1 import predictor_pb2 as ppb
from modelgrid.registry.v1 import registry_pb2 as rpb
from modelgrid.trainer.v1 import trainer_pb2 as tpb
from services.kit.localinfra import ConsulAgent
from services.kit.processes import REPO_ROOT

pytestmark = pytest.mark.slow

ADMIN_KEY = "sdk-admin-key-for-tests"
SDK = REPO_ROOT / "clients" / "python"
X = np.array([[0.5, -1.0, 2.0, 0.1], [1.0, 2.0, 3.0, 4.0], [-0.3, 0.0, 0.7, -2.0]], dtype=np.float32)


def oldest_python() -> str:
    """The oldest Python 3.10+ this machine has that runs (the library's floor), else this interpreter."""
    for version in ("3.10", "3.11"):
        candidates = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")))
        candidates += [found] if (found := shutil.which(f"python{version}")) else []
        for python in candidates:
            if subprocess.run([python, "-c", "import venv"], capture_output=True, timeout=30).returncode == 0:
                return python
    return sys.executable


def _wait_served(channel, ref: str, timeout: float = 120) -> None:
    predictor = PredictorClient(channel, timeout=10)
    deadline = time.monotonic() + timeout
    while True:
        try:
            predictor.predict(ref, {"x": X})
            return
        except (NotFound, Unavailable) as exc:
            assert time.monotonic() < deadline, f"{ref} never answered through the gateway: {exc}"
            time.sleep(0.3)


@pytest.fixture(scope="module")
def mesh(
    internal_tls_dir,
    redis_server,
    tmp_path_factory,
    launch,
    client_for,
    unique,
    build_saved_model,
    tf_reference,
    gateway_certificate,
):
    tmp = tmp_path_factory.mktemp("sdk")
    ca, cert, key = gateway_certificate(tmp / "public-tls")
    with ConsulAgent(tmp / "consul", tls_dir=internal_tls_dir) as consul:
        registry = launch.registry(consul.http_url, redis_server.url, tmp / "reg")
        channel, client = client_for(registry)
        model = unique("sdk")
        client.ensure_model(model)
        path = build_saved_model(tmp / "m1", seed=1)
        client.push_savedmodel(model, path)
        client.stub.SetAlias(rpb.SetAliasRequest(model_name=model, alias="production", version=1))
        keys = {"AUTH_ENABLED": "true", "ADMIN_KEY": ADMIN_KEY, "REDIS_KEY_PREFIX": f"mg:test-sdk:{unique('k')}:"}
        with launch.together():
            predictor = launch.predictor(
                consul.http_url, redis_server.url, tmp / "p", [{"name": model, "aliases": ["production"]}]
            )
            trainer = launch.trainer(consul.http_url, redis_server.url, tmp / "t", f"mg:test-sdk-t:{unique('t')}:")
            plain = launch.gateway(consul.http_url, redis_server.url, tmp, **keys)
            secure = launch.gateway(
                consul.http_url, redis_server.url, tmp, ca.read_bytes(), TLS_CERT=str(cert), TLS_KEY=str(key), **keys
            )
        try:
            with connect(plain.target, api_key=ADMIN_KEY) as gateway:
                _wait_served(gateway, f"{model}@production")
                admin = gateway_pb2_grpc.GatewayAdminStub(gateway)
                read_key = admin.CreateApiKey(gpb.CreateApiKeyRequest(name="sdk-read", scopes=[gpb.SCOPE_READ])).secret
            yield SimpleNamespace(
                tmp=tmp,
                model=model,
                reference=tf_reference(path),
                target=plain.target,
                secure=secure.target,
                ca=ca,
                read_key=read_key,
            )
        finally:
            for process in (secure, plain, trainer, predictor):
                process.stop()
            channel.close()
            registry.stop()


# ---- the README, in a clean virtualenv --------------------------------------------------------------------------


def readme_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (SDK / "README.md").read_text(), re.DOTALL)


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory) -> SimpleNamespace:
    """A new virtualenv with modelgrid-client installed from the repository by pip, as the README says."""
    venv = tmp_path_factory.mktemp("sdk-venv") / "venv"
    python = oldest_python()
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "-q", str(SDK)], check=True, timeout=900)
    site = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return SimpleNamespace(python=str(venv / "bin" / "python"), site=Path(site), pip=pip)


def test_the_library_installs_without_tensorflow(clean_venv):
    names = subprocess.run([*clean_venv.pip, "list", "--format=json"], capture_output=True, text=True, check=True)
    installed = {package["name"].lower() for package in json.loads(names.stdout)}
    assert "modelgrid-client" in installed
    assert not installed & {"tensorflow", "tensorflow-cpu", "tf-keras", "keras"}, installed
    size = sum(f.stat().st_size for f in clean_venv.site.rglob("*") if f.is_file())
    probe = "import modelgrid.client, importlib.util as u, sys; print(sys.version_info[:2], u.find_spec('tensorflow'))"
    out = subprocess.run([clean_venv.python, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("None"), out
    version = out.split(" None")[0]
    print(f"\nmodelgrid-client on Python {version}: {size / 1e6:.0f} MB in site-packages", sorted(installed))


@pytest.mark.parametrize("index", range(len(readme_examples())))
def test_the_readme_examples_run_against_the_mesh(mesh, clean_venv, index):
    code = readme_examples()[index]
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(mesh.tmp),
        "MODELGRID_TARGET": mesh.target,
        "MODELGRID_API_KEY": ADMIN_KEY,
        "MODELGRID_MODEL": mesh.model,
    }
    result = subprocess.run([clean_venv.python, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"README example {index + 1} failed:\n{result.stdout}\n{result.stderr}"
    expected = [
        [f"{mesh.model}@production is version 1", "version 1: y float32 [2, 3]", "OIP agrees: True"],
        ["32 answers, from versions [1]", "OIP: y [32, 3], ready True"],
        [mesh.model, "not found:", "refused:"],
    ][index]
    for text in expected:
        assert text in result.stdout, result.stdout


# ---- each client, through the gateway --------------------------------------------------------------------------


def test_blocking_clients_answer_what_tensorflow_computes(mesh):
    with connect(mesh.target, api_key=ADMIN_KEY) as channel:
        version = RegistryClient(channel).resolve(f"{mesh.model}@production")
        assert version.version == 1 and len(version.artifact.digest) >= 64  # sha256, hex
        answer = PredictorClient(channel).predict(f"{mesh.model}@production", {"x": X})
        assert (answer.model, answer.version) == (mesh.model, 1)
        np.testing.assert_allclose(answer.outputs["y"], mesh.reference(X), rtol=1e-5, atol=1e-6)


async def test_asyncio_clients(mesh):
    async with aio_connect(mesh.target, api_key=ADMIN_KEY) as channel:
        predictor = AsyncPredictorClient(channel)
        answers = await asyncio.gather(*(predictor.predict(mesh.model, {"x": X[i : i + 1]}) for i in range(3)))
        rows = np.concatenate([a.outputs["y"] for a in answers])
        np.testing.assert_allclose(rows, mesh.reference(X), rtol=1e-5, atol=1e-6)
        assert (await predictor.metadata(mesh.model)).name == mesh.model
        assert (await AsyncRegistryClient(channel).get_model(mesh.model)).aliases == {"production": 1}
        assert isinstance((await AsyncTrainerClient(channel).jobs()).jobs, type(tpb.ListJobsResponse().jobs))


def test_a_batch_job_runs_to_its_results(mesh, tmp_path):
    rows = np.random.default_rng(3).normal(size=(50, 4)).astype(np.float32)
    with connect(mesh.target, api_key=ADMIN_KEY) as channel:
        predictor = PredictorClient(channel)
        job = predictor.batch_predict(f"{mesh.model}@production", {"x": rows}, batch_size=16)
        deadline = time.monotonic() + 60
        while job.state not in (ppb.BATCH_JOB_STATE_SUCCEEDED, ppb.BATCH_JOB_STATE_FAILED):
            assert time.monotonic() < deadline, f"batch job stuck in {ppb.BatchJobState.Name(job.state)}"
            time.sleep(0.2)
            job = predictor.batch_job(job.id)
        assert job.state == ppb.BATCH_JOB_STATE_SUCCEEDED, job
        assert job.total_records == 50 and job.version == 1
        RegistryClient(channel).download_blob(job.output_digest, tmp_path / "out.npz")
    with np.load(tmp_path / "out.npz") as results:
        np.testing.assert_allclose(results["y"], mesh.reference(rows), rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidArgument, match="same first dimension"):
        predictor.batch_predict(mesh.model, {"x": rows, "z": rows[:3]})


def test_training_jobs_are_submitted_found_and_cancelled(mesh, digits_spec):
    spec = digits_spec(workers=1)
    request_id = f"sdk-{uuid.uuid4().hex[:8]}"
    with connect(mesh.target, api_key=ADMIN_KEY) as channel:
        trainer = TrainerClient(channel)
        job = trainer.submit(spec, request_id=request_id)
        assert trainer.submit(spec, request_id=request_id).id == job.id  # the same request: the same job
        assert trainer.job(job.id).spec.recipe == "mlp"
        assert job.id in [j.id for j in trainer.jobs().jobs]
        assert trainer.logs(job.id) == []  # no worker has run it: there are no agents
        assert trainer.cancel(job.id).state in (tpb.JOB_STATE_CANCELLING, tpb.JOB_STATE_CANCELLED)
        with pytest.raises(NotFound):
            trainer.job("no-such-job")
        with pytest.raises(InvalidArgument, match="not a valid job spec"):
            trainer.submit({"name": "typo", "recipie": "mlp"})


def test_keys_scopes_and_tls(mesh):
    with connect(mesh.target, api_key="not-a-key") as channel, pytest.raises(Unauthenticated):
        PredictorClient(channel).predict(mesh.model, {"x": X})
    with connect(mesh.target, api_key=mesh.read_key) as channel:
        assert RegistryClient(channel).get_model(mesh.model).name == mesh.model  # READ may read
        with pytest.raises(PermissionDenied, match="PREDICT"):
            PredictorClient(channel).predict(mesh.model, {"x": X})
    with connect(mesh.secure, api_key=ADMIN_KEY, tls=True, ca=mesh.ca) as channel:
        answer = PredictorClient(channel).predict(mesh.model, {"x": X})
        np.testing.assert_allclose(answer.outputs["y"], mesh.reference(X), rtol=1e-5, atol=1e-6)
    with connect(mesh.secure, api_key=ADMIN_KEY, tls=True) as channel, pytest.raises(Unavailable):
        PredictorClient(channel, timeout=10).predict(mesh.model, {"x": X})  # the system's roots do not know the CA
