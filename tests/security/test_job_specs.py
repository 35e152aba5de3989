"""Class 2, job specs confined: SubmitJob may name a data set only as a registry blob or a file inside the trainer's
data set roots (`..` and symlinks resolved first), no error shows a byte of a file or whether a path outside exists,
a blob digest is checked before it names anything on disk, and every number and recipe parameter is bounded at
submit. Each attack directly on the trainer, through the gateway's native port and through its gRPC-Web port."""

import hashlib
import math
import os

import grpc
import pytest

from modelgrid.registry.v1 import registry_pb2 as rpb
from modelgrid.trainer.v1 import trainer_pb2 as tpb

SUBMIT = "/modelgrid.trainer.v1.Trainer/SubmitJob"
VIAS = ("direct", "gateway", "web")
CANARY = "TOP-SECRET-CANARY-4411"
"""The content of the file outside the roots: no error may show it."""


def _trainer_settings(tmp):
    """Data set root `data-root` (the digits NPZ, symlinks out of it) next to `outside` (a CSV with a secret)."""
    root, outside = tmp / "data-root", tmp / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.csv").write_text(f"label,{CANARY}\n1,{CANARY}\n")
    (root / "link-out.csv").symlink_to(outside / "secret.csv")
    (root / "dir-out").symlink_to(outside, target_is_directory=True)
    (root / "link-passwd.csv").symlink_to("/etc/passwd")
    return {"DATASET_ROOTS": f'["{root}"]'}


MESH = {"trainer": _trainer_settings}


@pytest.fixture(scope="module")
def root(mesh, digits_copy):
    directory = mesh.tmp / "data-root"
    digits_copy(directory)
    return directory


@pytest.fixture
def spec(root, digits_spec):
    """`spec(**changes)`: a valid job spec on the digits data in the root, as JobSpec."""

    def make(**overrides) -> tpb.JobSpec:
        made = digits_spec(**overrides)
        if not made.dataset.blob_digest and made.dataset.local_path.endswith("digits/digits.npz"):
            made.dataset.local_path = str(root / "digits.npz")
        return made

    return make


def job_count(mesh) -> int:
    reply = mesh.unary("direct", "/modelgrid.trainer.v1.Trainer/ListJobs", tpb.ListJobsRequest(page_size=500))
    return len(tpb.ListJobsResponse.FromString(reply.assert_code(grpc.StatusCode.OK).replies[0]).jobs)


def submit(mesh, via: str, spec: tpb.JobSpec):
    return mesh.unary(via, SUBMIT, tpb.SubmitJobRequest(spec=spec))


def with_dataset(spec: tpb.JobSpec, **fields) -> tpb.JobSpec:
    spec.dataset.ClearField("local_path")
    for name, value in fields.items():
        setattr(spec.dataset, name, value)
    return spec


@pytest.mark.parametrize("via", VIAS)
def test_a_file_inside_the_roots_reaches_the_job_only_as_a_registry_blob(mesh, root, spec, via):
    """Class 2, the control and what confinement leaves: the spec with its data inside a root is queued (so the
    refusals below are about the path), and the job holds the file's registry blob digest, the only form in which
    the data leaves the trainer's host (agents never get a trainer path); cancelled again (no agent runs here)."""
    before = job_count(mesh)
    job = tpb.Job.FromString(submit(mesh, via, spec()).assert_code(grpc.StatusCode.OK).replies[0])
    assert job_count(mesh) == before + 1
    assert job.dataset_digest == hashlib.sha256((root / "digits.npz").read_bytes()).hexdigest()
    stat = mesh.unary(
        "direct", "/modelgrid.registry.v1.ModelRegistry/StatBlob", rpb.StatBlobRequest(digest=job.dataset_digest)
    )
    stat.assert_code(grpc.StatusCode.OK)
    mesh.unary("direct", "/modelgrid.trainer.v1.Trainer/CancelJob", tpb.CancelJobRequest(id=job.id)).assert_code(
        grpc.StatusCode.OK
    )


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("data_format", ["csv", "npz"])
def test_files_outside_the_roots_are_refused_without_their_content(mesh, spec, via, data_format):
    """Class 2, reading the trainer's files: /etc/passwd, another file outside the roots and a path that does not
    exist are refused alike (INVALID_ARGUMENT, one message: no existence oracle), with nothing of the files in it,
    and no job is queued."""
    before = job_count(mesh)
    answers = set()
    for path in ("/etc/passwd", str(mesh.tmp / "outside" / "secret.csv"), "/etc/no-such-file-here"):
        outcome = submit(mesh, via, with_dataset(spec(), local_path=path, format=data_format))
        outcome.assert_code(grpc.StatusCode.INVALID_ARGUMENT, "not a file inside the trainer's data set roots")
        assert CANARY not in outcome.details and "root:" not in outcome.details and "/bin/" not in outcome.details
        answers.add(outcome.details)
    assert len(answers) == 1, answers
    assert job_count(mesh) == before


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize(
    "relative",
    [
        "../outside/secret.csv",
        "sub/../../outside/secret.csv",
        "../../../../../../../../etc/passwd",
        "link-out.csv",
        "dir-out/secret.csv",
        "link-passwd.csv",
    ],
    ids=["dotdot", "nested-dotdot", "dotdot-passwd", "file-symlink", "dir-symlink", "symlink-passwd"],
)
def test_paths_escaping_a_root_are_refused(mesh, root, spec, via, relative):
    """Class 2, path traversal: a path that starts in a root but leaves it via `..` or a symlink (to a file or a
    directory) is refused as any path outside, showing nothing of the file."""
    before = job_count(mesh)
    outcome = submit(mesh, via, with_dataset(spec(), local_path=f"{root}/{relative}", format="csv"))
    outcome.assert_code(grpc.StatusCode.INVALID_ARGUMENT, "not a file inside the trainer's data set roots")
    assert CANARY not in outcome.details and "root:" not in outcome.details
    assert job_count(mesh) == before


@pytest.mark.parametrize("via", VIAS)
def test_relative_paths_and_nul_bytes_are_refused(mesh, spec, via):
    """Class 2, path tricks: a relative path (resolved against the trainer's working directory) and a NUL byte."""
    for path in ("data/digits/digits.npz", "digits.npz", "/etc/passwd\x00.npz"):
        submit(mesh, via, with_dataset(spec(), local_path=path)).assert_code(grpc.StatusCode.INVALID_ARGUMENT)


def _directories(top) -> set[str]:
    return {str(p) for p in top.rglob("*") if p.is_dir()}


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize(
    "digest",
    ["../../x", "../../escaped/x", "../escaped/x", "../../../escaped/x", "/tmp/escaped/x", "A" * 64, "ab" * 31 + "/x"],
)
def test_a_malformed_blob_digest_names_nothing_on_disk(mesh, spec, via, digest):
    """Class 2, path traversal through a blob digest: anything but 64 lower-case hex digits is INVALID_ARGUMENT
    before it names a file: no directory appears (the trainer keeps blobs in <scratch>/datasets/<digest>)."""
    before = _directories(mesh.tmp)
    outcome = submit(mesh, via, with_dataset(spec(), blob_digest=digest))
    outcome.assert_code(grpc.StatusCode.INVALID_ARGUMENT, "64 lower-case hex characters")
    assert _directories(mesh.tmp) == before
    scratch = mesh.tmp / "trainer" / "shared"
    for escaped in (scratch / "escaped", scratch.parent / "escaped", mesh.tmp / "escaped", scratch / "datasets"):
        assert not escaped.exists(), escaped
    assert not os.path.exists("/tmp/escaped")


def _hp(**values):
    return lambda spec: [setattr(spec.hyper_parameters, k, v) for k, v in values.items()]


def _params(**values):
    def change(spec):
        spec.recipe_params.Clear()
        spec.recipe_params.update(values)

    return change


OUT_OF_RANGE = {
    "epochs-negative": (_hp(epochs=-3), "epochs must be between 1"),
    "epochs-huge": (_hp(epochs=2**31 - 1), "MODELGRID_TRAINER_MAX_EPOCHS"),
    "batch-negative": (_hp(batch_size=-5), "batch_size must be between 1"),
    "batch-huge": (_hp(batch_size=2**31 - 1), "MODELGRID_TRAINER_MAX_BATCH_SIZE"),
    "lr-nan": (_hp(learning_rate=math.nan), "learning_rate must be a finite number"),
    "lr-inf": (_hp(learning_rate=math.inf), "learning_rate must be a finite number"),
    "lr-negative": (_hp(learning_rate=-0.1), "learning_rate must be between"),
    "split-nan": (_hp(validation_split=math.nan), "validation_split must be a finite number"),
    "optimizer": (_hp(optimizer="__import__('os')"), "optimizer must be one of"),
    "num-classes-huge": (lambda s: setattr(s.dataset, "num_classes", 2**31 - 1), "MODELGRID_TRAINER_MAX_NUM_CLASSES"),
    "workers-huge": (lambda s: setattr(s, "workers", 1_000_000), "workers must be between 1 and"),
    "restarts-huge": (lambda s: setattr(s, "max_restarts", 1_000_000), "MAX_RESTARTS_LIMIT"),
    "hidden-units-huge": (_params(hidden_units=[10**9]), "MODELGRID_TRAINER_MAX_LAYER_UNITS"),
    "too-many-layers": (_params(hidden_units=[8] * 1000), "a list of at most"),
    "unknown-param": (_params(hidden_units=[8], shell="rm -rf /"), "takes no parameter"),
    "params-too-big": (_params(activation="x" * 70_000), "MODELGRID_TRAINER_MAX_RECIPE_PARAMS_BYTES"),
    "unknown-recipe": (lambda s: setattr(s, "recipe", "os.system"), "unknown recipe"),
    "recipe-file-escape": (lambda s: setattr(s, "recipe", "file:../../../../etc/passwd"), "invalid job spec"),
}


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("case", OUT_OF_RANGE)
def test_out_of_range_numbers_and_unknown_recipe_parameters_are_refused_at_submit(mesh, spec, via, case):
    """Class 2, resource abuse through a spec: epochs, batch size, learning rate (NaN, inf), class count, workers,
    restarts, layer sizes and unknown or oversized recipe parameters out of their bounds are INVALID_ARGUMENT at
    submit, naming the bound, and nothing is queued."""
    change, fragment = OUT_OF_RANGE[case]
    made = spec()
    change(made)
    before = job_count(mesh)
    submit(mesh, via, made).assert_code(grpc.StatusCode.INVALID_ARGUMENT, fragment)
    assert job_count(mesh) == before
