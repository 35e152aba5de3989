"""The one derivation of load state every protocol reads: ModelStatus/VersionStatus built from a served model,
pure (no registry, no TensorFlow)."""

import pytest

from modelgrid.client.errors import InvalidArgument
from services.predictor.control import model_status
from services.predictor.domain import ModelState, VersionPolicy, VersionState
from services.predictor.repository import ServedModel, ServedVersion
from services.predictor.runtime import IOSpec, ModelSignature


def signature(width: int) -> ModelSignature:
    return ModelSignature("serving_default", (IOSpec("x", "float32", (-1, width)),), (IOSpec("y", "float32", (-1, 3)),))


def version(number: int, state: VersionState, reason: str = "", width: int = 4) -> ServedVersion:
    served = ServedVersion("m", number, f"digest-{number}")
    served.state, served.reason = state, reason
    if state != VersionState.LOADING and not reason:
        served.signature = signature(width)
        served.available_since = 1000.0 + number
    return served


def model(*versions: ServedVersion, routes=None, reason: str = "", settled: bool = True) -> ServedModel:
    served = ServedModel("m", VersionPolicy(latest=3), {v.version: v for v in versions}, dict(routes or {}), reason)
    if settled:
        served.settled.set()
    return served


def test_a_model_before_its_first_reconciliation_is_loading():
    status = model_status(model(settled=False))
    assert status.state == ModelState.LOADING and status.versions == () and status.signature is None


def test_a_settled_model_without_an_available_version_is_unavailable_with_every_reason():
    status = model_status(
        model(version(1, VersionState.FAILED, "bad bytes"), version(2, VersionState.LOADING), reason="alias unset")
    )
    assert status.state == ModelState.UNAVAILABLE
    assert [v.version for v in status.versions] == [2, 1]  # newest first
    assert status.failure() == "alias unset; version 1: bad bytes"
    assert model_status(model()).failure() == "no version became available"


def test_available_versions_signature_aliases_and_timestamps():
    status = model_status(
        model(
            version(1, VersionState.AVAILABLE, width=4),
            version(2, VersionState.AVAILABLE, width=5),
            version(3, VersionState.UNLOADING),
            version(4, VersionState.LOADING),
            routes={"production": 1, "canary": 2, "stable": 1},
        )
    )
    assert status.state == ModelState.AVAILABLE
    assert [v.version for v in status.available] == [2, 1]
    assert status.signature == signature(5)  # the newest available version's: what a plain request runs on
    by_number = {v.version: v for v in status.versions}
    assert by_number[1].aliases == ("production", "stable") and by_number[2].aliases == ("canary",)
    assert by_number[1].available_since == 1001.0
    assert by_number[3].available_since == 0.0 and by_number[3].state == VersionState.UNLOADING
    assert by_number[4].signature is None and not by_number[4].available
    assert status.routes == {"production": 1, "canary": 2, "stable": 1}


def test_a_status_is_a_snapshot():
    served = model(version(1, VersionState.AVAILABLE), routes={"production": 1})
    status = model_status(served)
    served.routes["production"] = 2
    served.versions[1].state = VersionState.UNLOADING
    assert status.routes == {"production": 1} and status.versions[0].state == VersionState.AVAILABLE


@pytest.mark.parametrize(
    "kwargs", [{"latest": 1, "versions": (1,)}, {"versions": (0,)}, {"latest": -1}, {"aliases": ("Bad",)}]
)
def test_a_version_policy_takes_one_valid_choice(kwargs):
    with pytest.raises(InvalidArgument):
        VersionPolicy(**kwargs)


def test_the_default_policy_is_the_newest_version():
    assert VersionPolicy().effective_latest == 1
    assert VersionPolicy(aliases=("production",)).effective_latest == 0
    assert VersionPolicy(latest=3).effective_latest == 3
