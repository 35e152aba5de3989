"""What the fuzzer found, fixed at the source (pure logic, no servers): numbers sent as text, enum values no enum
defines, a Struct holding NaN, and status messages too big for gRPC's metadata: each a clear client error (or a
bounded message), never a ValueError that becomes INTERNAL."""

import math

import pytest
from google.protobuf import struct_pb2

from modelgrid.client.convert import parse_number
from modelgrid.client.errors import InvalidArgument
from modelgrid.client.registry.convert import format_from_pb, status_from_pb
from modelgrid.registry.v1 import registry_pb2
from modelgrid.trainer.v1 import trainer_pb2
from services.kit.interceptors import MAX_DETAILS_BYTES, _bounded
from services.trainer.converters import spec_from_pb, state_from_pb


@pytest.mark.parametrize("text", ["9" * 4301, "9" * 19, "-1", "1e3", "١٢", " 1", ""])
def test_numbers_sent_as_text_are_bounded_digits(text):
    with pytest.raises(InvalidArgument, match="at most 18 digits"):
        parse_number(text, "page_token")


def test_a_number_within_bounds_parses():
    assert parse_number("0", "page_token") == 0 and parse_number("9" * 18, "page_token") == 10**18 - 1


def test_enum_values_no_enum_defines_are_invalid_arguments():
    with pytest.raises(InvalidArgument, match="unknown version status 5"):
        status_from_pb(5)
    with pytest.raises(InvalidArgument, match="unknown artifact format 7"):
        format_from_pb(7)
    with pytest.raises(InvalidArgument, match="unknown job state 11"):
        state_from_pb(11)
    assert status_from_pb(registry_pb2.VERSION_STATUS_READY).value == "READY"


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_recipe_params_that_json_cannot_hold_are_refused(value):
    spec = trainer_pb2.JobSpec(recipe_params=struct_pb2.Struct(fields={"a": struct_pb2.Value(number_value=value)}))
    with pytest.raises(InvalidArgument, match="finite"):
        spec_from_pb(spec)


def test_status_messages_are_cut_to_a_size_grpc_metadata_takes():
    assert _bounded("short") == "short"
    for huge in ("x" * 100_000, "é" * 100_000, "😀" * 100_000):
        cut = _bounded(huge)
        assert len(cut.encode()) <= MAX_DETAILS_BYTES and cut.endswith("(cut short)")
