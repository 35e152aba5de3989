"""Class 5, registry bounds: names and aliases are matched in full (a trailing newline does not slip past a `$`),
and descriptions, tags, metrics and parameters of models and versions are bounded; a request past a bound is
INVALID_ARGUMENT naming the limit, echoes no more than the start of what was sent, and stores nothing. Directly on
the registry, through the gateway and over gRPC-Web. The registry here allows 100-character descriptions, 4 entries
per map and 64-character values."""

import math

import grpc
import pytest

from modelgrid.registry.v1 import registry_pb2 as rpb

MESH = {"registry": {"MAX_DESCRIPTION_CHARS": "100", "MAX_ENTRIES": "4", "MAX_VALUE_CHARS": "64"}}
VIAS = ("direct", "gateway", "web")
REGISTRY = "/modelgrid.registry.v1.ModelRegistry"
LONGEST_ERROR = 400
"""No error may be longer: it would echo what was sent."""


@pytest.fixture(scope="module")
def held(mesh, unique, tmp_path_factory):
    """A model with description "kept", tags {a: 1} and version 1 (tags {t: 1}): what refused changes must keep."""
    name = unique("held")
    client = mesh.registry_client()
    mesh.unary(
        "direct", f"{REGISTRY}/CreateModel", rpb.CreateModelRequest(name=name, description="kept", tags={"a": "1"})
    )
    artifact = tmp_path_factory.mktemp("artifact") / "artifact.bin"
    artifact.write_bytes(b"an artifact")
    digest = client.upload_blob(artifact).digest
    meta = rpb.VersionMetadata(model_name=name, artifact_digest=digest, from_blob=True, tags={"t": "1"})
    created = mesh.streamed(
        "direct", f"{REGISTRY}/CreateVersion", [rpb.CreateVersionRequest(metadata=meta)], kind="stream_unary"
    )
    created.assert_code(grpc.StatusCode.OK)
    return {"name": name, "digest": digest}


def invalid(outcome, *fragments: str) -> None:
    outcome.assert_code(grpc.StatusCode.INVALID_ARGUMENT, *fragments)
    assert len(outcome.details) < LONGEST_ERROR, f"the error echoes the request: {outcome.details[:100]}..."


def get_model(mesh, name: str):
    return mesh.unary("direct", f"{REGISTRY}/GetModel", rpb.GetModelRequest(name=name))


def model_of(mesh, name: str) -> rpb.RegisteredModel:
    return rpb.RegisteredModel.FromString(get_model(mesh, name).assert_code(grpc.StatusCode.OK).replies[0])


def versions_of(mesh, name: str) -> list[rpb.ModelVersion]:
    reply = mesh.unary("direct", f"{REGISTRY}/ListVersions", rpb.ListVersionsRequest(model_name=name))
    return list(rpb.ListVersionsResponse.FromString(reply.assert_code(grpc.StatusCode.OK).replies[0]).versions)


def listed_with_prefix(mesh, prefix: str) -> list[str]:
    reply = mesh.unary("direct", f"{REGISTRY}/ListModels", rpb.ListModelsRequest(name_prefix=prefix))
    return [m.name for m in rpb.ListModelsResponse.FromString(reply.assert_code(grpc.StatusCode.OK).replies[0]).models]


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize(
    "suffix",
    ["\n", "\r\n", "\x00", " ", "/../../etc", "..", "\u202e"],
    ids=["lf", "crlf", "nul", "space", "path", "dotdot", "rtl"],
)
def test_a_name_with_a_trailing_newline_or_other_suffix_is_refused(mesh, unique, via, suffix):
    """Class 5, smuggled names: a valid name followed by a newline (which `re.match(...$)` accepts), a NUL, a
    path or an override character is INVALID_ARGUMENT, and no model of that name or prefix is stored."""
    name = unique("sneaky")
    invalid(
        mesh.unary(via, f"{REGISTRY}/CreateModel", rpb.CreateModelRequest(name=name + suffix)), "invalid model name"
    )
    get_model(mesh, name).assert_code(grpc.StatusCode.NOT_FOUND)
    assert listed_with_prefix(mesh, name) == []


@pytest.mark.parametrize("via", VIAS)
def test_an_over_long_name_is_refused_without_being_echoed(mesh, via):
    """Class 5, oversized names: 129 characters and 100,000 characters are INVALID_ARGUMENT with a short error."""
    for name in ("n" * 129, "n" * 100_000):
        invalid(mesh.unary(via, f"{REGISTRY}/CreateModel", rpb.CreateModelRequest(name=name)), "invalid model name")
    assert listed_with_prefix(mesh, "nnnnnnnn") == []


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("alias", ["production\n", "production\x00", "Production", "p" * 64, "", "prod/../x"])
def test_a_malformed_alias_is_refused_and_not_set(mesh, held, via, alias):
    """Class 5, smuggled aliases: an alias with a trailing newline, a NUL, capitals, 64 characters, none or a path
    is INVALID_ARGUMENT on SetAlias; the model keeps no alias."""
    request = rpb.SetAliasRequest(model_name=held["name"], alias=alias, version=1)
    invalid(mesh.unary(via, f"{REGISTRY}/SetAlias", request), "alias")
    assert dict(model_of(mesh, held["name"]).aliases) == {}


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"description": "d" * 101}, "MODELGRID_REGISTRY_MAX_DESCRIPTION_CHARS"),
        ({"description": "d" * 1_000_000}, "MODELGRID_REGISTRY_MAX_DESCRIPTION_CHARS"),
        ({"tags": {f"k{i}": "v" for i in range(5)}}, "MODELGRID_REGISTRY_MAX_ENTRIES"),
        ({"tags": {"k": "v" * 65}}, "MODELGRID_REGISTRY_MAX_VALUE_CHARS"),
        ({"tags": {"bad\nkey": "v"}}, "printable"),
        ({"tags": {"k" * 129: "v"}}, "printable"),
        ({"tags": {"": "v"}}, "printable"),
    ],
    ids=["description", "huge-description", "too-many-tags", "long-tag-value", "newline-key", "long-key", "empty-key"],
)
def test_oversized_model_metadata_is_refused_and_nothing_stored(mesh, held, unique, via, fields, fragment):
    """Class 5, storage abuse on models: descriptions, tag counts, tag values and keys past their bounds are
    INVALID_ARGUMENT naming the bound, on CreateModel (no model stored) and UpdateModel (the model unchanged)."""
    name = unique("oversized")
    invalid(mesh.unary(via, f"{REGISTRY}/CreateModel", rpb.CreateModelRequest(name=name, **fields)), fragment)
    get_model(mesh, name).assert_code(grpc.StatusCode.NOT_FOUND)
    update = rpb.UpdateModelRequest(name=held["name"])
    if "description" in fields:
        update.description = fields["description"]
    update.set_tags.update(fields.get("tags", {}))
    invalid(mesh.unary(via, f"{REGISTRY}/UpdateModel", update), fragment)
    model = model_of(mesh, held["name"])
    assert (model.description, dict(model.tags)) == ("kept", {"a": "1"})


def test_tags_are_bounded_as_a_whole(mesh, held):
    """Class 5, growing a map past its bound in steps: 1 tag held plus 4 added is over MAX_ENTRIES (4), refused,
    though each request alone is within it."""
    update = rpb.UpdateModelRequest(name=held["name"], set_tags={f"n{i}": "v" for i in range(4)})
    invalid(mesh.unary("gateway", f"{REGISTRY}/UpdateModel", update), "MODELGRID_REGISTRY_MAX_ENTRIES")
    assert dict(model_of(mesh, held["name"]).tags) == {"a": "1"}


VERSION_METADATA = {
    "description": ({"description": "d" * 101}, "MODELGRID_REGISTRY_MAX_DESCRIPTION_CHARS"),
    "too-many-params": ({"params": {f"p{i}": "v" for i in range(5)}}, "MODELGRID_REGISTRY_MAX_ENTRIES"),
    "long-param": ({"params": {"p": "v" * 65}}, "MODELGRID_REGISTRY_MAX_VALUE_CHARS"),
    "too-many-metrics": ({"metrics": {f"m{i}": 1.0 for i in range(5)}}, "MODELGRID_REGISTRY_MAX_ENTRIES"),
    "nan-metric": ({"metrics": {"loss": math.nan}}, "finite"),
    "inf-metric": ({"metrics": {"loss": math.inf}}, "finite"),
    "too-many-tags": ({"tags": {f"t{i}": "v" for i in range(5)}}, "MODELGRID_REGISTRY_MAX_ENTRIES"),
    "long-request-id": ({"request_id": "r" * 129}, "request_id"),
}


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("case", VERSION_METADATA)
def test_oversized_version_metadata_is_refused_and_no_version_stored(mesh, held, via, case):
    """Class 5, storage abuse on versions: CreateVersion with too long a description, too many or too long params,
    too many or non-finite metrics, too many tags or an over-long request id is INVALID_ARGUMENT, and the model
    keeps its one version."""
    fields, fragment = VERSION_METADATA[case]
    meta = rpb.VersionMetadata(model_name=held["name"], artifact_digest=held["digest"], from_blob=True, **fields)
    created = mesh.streamed(
        via, f"{REGISTRY}/CreateVersion", [rpb.CreateVersionRequest(metadata=meta)], kind="stream_unary"
    )
    invalid(created, fragment)
    assert [v.version for v in versions_of(mesh, held["name"])] == [1]


@pytest.mark.parametrize("via", VIAS)
def test_oversized_version_updates_are_refused_and_change_nothing(mesh, held, via):
    """Class 5, storage abuse on an existing version: UpdateVersion past a bound changes nothing."""
    name = held["name"]
    for request, fragment in [
        (rpb.UpdateVersionRequest(model_name=name, version=1, description="d" * 101), "MAX_DESCRIPTION_CHARS"),
        (
            rpb.UpdateVersionRequest(model_name=name, version=1, set_tags={f"t{i}": "v" for i in range(4)}),
            "MAX_ENTRIES",
        ),
        (rpb.UpdateVersionRequest(model_name=name, version=1, set_metrics={"acc": math.nan}), "finite"),
    ]:
        invalid(mesh.unary(via, f"{REGISTRY}/UpdateVersion", request), fragment)
    (version,) = versions_of(mesh, name)
    assert (version.description, dict(version.tags), dict(version.metrics)) == ("", {"t": "1"}, {})
