"""Fixtures of the fuzz tier: protobuf-aware Hypothesis strategies built from any message Descriptor, raw-bytes calls
to real service processes, and the rules every answer must keep.

A fuzz target sends one generated case (a request as bytes, or a list of them for a stream) per example, through a
channel method with identity serializers, so the server also sees bytes that do not parse. Every answer must be OK
or a client error (never INTERNAL or UNKNOWN), come back within its deadline, and parse as the method's response.
A target does not stop at the first bad answer: it records each distinct finding (method, code, message) with the
smallest request seen for it, and fails at its end with all of them.

Bounds: `make test` runs MODELGRID_FUZZ_EXAMPLES examples per target (60 by default) from a fixed seed per target
(reproducible in CI); `make fuzz` sets MODELGRID_FUZZ_SECONDS (600 by default there), which is split evenly across
the collected targets, each running random batches until its share is spent. No Hypothesis database is written.

Tests reach these helpers through the `fuzz` and `protofuzz` fixtures; nothing here is imported by the tests.
"""

import functools
import hashlib
import math
import os
import re
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor as pbd
from google.protobuf import message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from services.kit.processes import ServiceProcess

EXAMPLES = int(os.environ.get("MODELGRID_FUZZ_EXAMPLES", "60"))
"""Examples per target in a bounded run (`make test`)."""
SECONDS = float(os.environ["MODELGRID_FUZZ_SECONDS"]) if os.environ.get("MODELGRID_FUZZ_SECONDS") else None
"""Total time budget of a `make fuzz` run, split across the collected targets; unset: a bounded run."""
BATCH = 200
"""Examples per Hypothesis run in a timed run (each run draws from a fresh random seed)."""
MAX_DEPTH = 4
"""Nesting of generated messages (google.protobuf.Struct is recursive)."""
MAX_HANGS = 3
"""A target stops after this many calls that outlived their deadline (each costs a whole timeout)."""
SLACK_S = 3.0
"""A call may come back this much later than its deadline (the client's own scheduling) before it is a hang."""

# Client errors: what a malformed or unknown request may get. UNAVAILABLE, UNIMPLEMENTED and DEADLINE_EXCEEDED are
# allowed per call only (a dependency outage the service documents, a method it does not serve, the caller's own
# short deadline on a stream that does not end by itself); INTERNAL, UNKNOWN, DATA_LOSS and CANCELLED never are.
CLIENT_ERRORS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.ABORTED,
    }
)

CORE_RACE = "Internal error from Core"
"""grpc.aio's message for a call whose write failed after the other side had ended it: a finding (see the check
below)."""

# Hypothesis keeps caches (constants it read from the code) in ./.hypothesis unless told otherwise: not in the repo.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "modelgrid-hypothesis")

_BASE_SETTINGS = settings(
    database=None,  # nothing written into the repository
    deadline=None,  # every example makes network calls
    phases=(Phase.explicit, Phase.generate),  # findings are collected, not raised: nothing to shrink
    suppress_health_check=list(HealthCheck),
    report_multiple_bugs=False,
)


# -- strategies ------------------------------------------------------------------------------------------------

_INT_RANGES = {
    pbd.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    pbd.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    pbd.FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    pbd.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    pbd.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    pbd.FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    pbd.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    pbd.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    pbd.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    pbd.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_INT_EDGES = (0, 1, -1, 2, 3, 4, 7, 8, 100, 127, 128, 255, 256, 1000, 1024, 4096, 65_535, 65_536, 1 << 20)
_INT_EDGES += (2**31 - 1, -(2**31), 2**31, 2**32 - 1, 2**32, 2**53, 2**53 + 1, 2**62, 2**63 - 1, -(2**63), 2**64 - 1)
_FLOAT_EDGES = (0.0, -0.0, 1.0, -1.0, 0.5, 1e-7, 1e308, -1e308, 5e-324, 3.4028235e38, 1e39, 2.0**53, 1e-45)
_FLOAT_EDGES += (math.nan, math.inf, -math.inf)
EDGE_STRINGS = (
    "", " ", "a", "Z", "0", "1", "-1", "01", "1e9", "0x10", "NaN", "inf", "null", "true", "None", "undefined",
    ".", "..", "...", "/", "//", "a/b", "a/../b", "../../../../etc/passwd", "/etc/passwd", "~", "~root", "*", "?",
    "%", "%s%s%n", "%00", "{}", "[]", '{"a": 1}', "\\", "'", '"', "`", "$(id)", "${HOME}", ";", "|", "&&",
    "a\nb", "\n", "\r\n", "\t", "\x00", "a\x00b", "\x7f", "\x1b[31m", "é", "ß", "İ", "\u0301", "\u200b", "\u202e",
    "\ufeff", "\uffff", "\U0010ffff", "日本語", "🙂", "𝔘",
    "a" * 62, "a" * 63, "a" * 64, "a" * 127, "a" * 128, "a" * 129, "a" * 4097,
    "0" * 64, "f" * 64, "F" * 64, "g" * 64, "0" * 63, "0" * 65,
    "a:1", "a:0", "a:-1", "a:1.5", "a:99999999999999999999", "a@b", "a@", "@b", "a:b@c", ":", "@", "a:", "a@B",
    "file:", "file:x.py", "file:../x.py", "file:/etc/passwd", "mlp", "cnn", "csv", "npz", "tfrecord", "adam", "sgd",
    "production", "canary", "latest", "serving_default", "x", "y", "FP32", "INT64", "BYTES", "BOOL", "FP16", "BF16",
    "signature_def", "timeout", "priority", "sequence_id", "binary_data", "classification", "config", "file:a",
    "0-0", "0-1", "$", "+", "1-1", "99999999999999-0", "-", "10", "9" * 30, "1 ", " 1",
)  # fmt: skip
HUGE_LENGTHS = (4097, 4301, 65_537, 1_048_577)  # 4301: past int("9" * n)'s default digit limit


@functools.cache
def _message_class(descriptor: pbd.Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


def _is_map(fd: pbd.FieldDescriptor) -> bool:
    return fd.type == fd.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry


def _repeated(fd: pbd.FieldDescriptor) -> bool:
    return fd.label == fd.LABEL_REPEATED


class ProtoStrategies:
    """Hypothesis strategies for protobuf messages, built by walking a Descriptor's fields.

    `hints` are strings the target knows to matter (an existing model name, an alias, a digest of a stored blob, a
    job id): string fields draw them as often as random text, so that generated requests get past the first lookup
    and reach deeper code. `byte_hints` do the same for bytes fields."""

    def __init__(self, hints: Sequence[str] = (), byte_hints: Sequence[bytes] = ()) -> None:
        self.hints = tuple(dict.fromkeys(hints))
        self.byte_hints = tuple(dict.fromkeys(byte_hints))
        self._messages: dict[tuple[str, int], st.SearchStrategy] = {}

    # scalars

    @functools.cached_property
    def strings(self) -> st.SearchStrategy[str]:
        huge = st.tuples(st.sampled_from(("a", "é", "\n", "9", "🙂")), st.sampled_from(HUGE_LENGTHS))
        parts = [
            st.sampled_from(EDGE_STRINGS),
            st.text(max_size=24),
            st.text(st.characters(codec="ascii"), max_size=12),
            huge.map(lambda t: t[0] * t[1]),
        ]
        if self.hints:
            hint = st.sampled_from(self.hints)
            parts += [
                hint,
                hint,
                hint,
                st.tuples(
                    hint, st.sampled_from(("", ":1", ":2", ":0", "@production", "@canary", "@x", "/..", "\x00"))
                ).map("".join),
                st.tuples(hint, st.sampled_from((0, 1, 2, -1))).map(_bend),
            ]
        return st.one_of(parts)

    @functools.cached_property
    def binaries(self) -> st.SearchStrategy[bytes]:
        parts = [
            st.binary(max_size=48),
            st.sampled_from((b"", b"\x00", b"\xff" * 8, b"\x80" * 11, b"\x00" * 16, b"\x00\x00\x80\x7f" * 4)),
            st.tuples(st.sampled_from((b"\x00", b"\xff", b"\x01")), st.sampled_from(HUGE_LENGTHS)).map(
                lambda t: t[0] * t[1]
            ),
        ]
        if self.byte_hints:
            hint = st.sampled_from(self.byte_hints)
            parts += [hint, hint, st.tuples(hint, st.integers(0, 64)).map(lambda t: t[0][: len(t[0]) - t[1]])]
        return st.one_of(parts)

    def scalar(self, fd: pbd.FieldDescriptor) -> st.SearchStrategy:
        t = fd.type
        if t in _INT_RANGES:
            lo, hi = _INT_RANGES[t]
            return st.one_of(st.sampled_from([v for v in _INT_EDGES if lo <= v <= hi]), st.integers(lo, hi))
        if t in (fd.TYPE_DOUBLE, fd.TYPE_FLOAT):
            width = 32 if t == fd.TYPE_FLOAT else 64
            edges = [v for v in _FLOAT_EDGES if width == 64 or not math.isfinite(v) or abs(v) < 3.5e38]
            return st.one_of(st.sampled_from(edges), st.floats(width=width))
        if t == fd.TYPE_BOOL:
            return st.booleans()
        if t == fd.TYPE_STRING:
            return self.strings
        if t == fd.TYPE_BYTES:
            return self.binaries
        if t == fd.TYPE_ENUM:
            numbers = [v.number for v in fd.enum_type.values]
            unknown = (max(numbers) + 1, -1, 2**31 - 1, -(2**31))
            return st.one_of(st.sampled_from(numbers), st.sampled_from(unknown), st.integers(-(2**31), 2**31 - 1))
        raise TypeError(f"no strategy for field {fd.full_name} of type {t}")

    # messages

    def message(self, descriptor: pbd.Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
        """Messages of `descriptor`'s type: any subset of its fields set (at most one member of each oneof),
        scalars at their edges, unknown enum numbers, strings from unicode to megabytes, repeated fields and maps
        of a few entries, nested messages down to MAX_DEPTH."""
        key = (descriptor.full_name, depth)
        if key not in self._messages:
            self._messages[key] = _fill(self, descriptor, depth)
        return self._messages[key]

    def mutated(self, seed_message: Message) -> st.SearchStrategy[Message]:
        """A valid message with some of its fields cleared and some replaced or merged with generated values: a
        request that looks right and is wrong in one or two places."""
        return _mutate(self, seed_message)

    def requests(self, descriptor: pbd.Descriptor, seeds: Sequence[Message] = ()) -> st.SearchStrategy[Message]:
        """Messages of a request type: generated from scratch, the seeds as they are, or mutated seeds."""
        parts = [self.message(descriptor)]
        if seeds:
            parts += [st.sampled_from(list(seeds)), *[self.mutated(s) for s in seeds]]
        return st.one_of(parts)

    def wire(self, descriptor: pbd.Descriptor, seeds: Sequence[Message] = ()) -> st.SearchStrategy[bytes]:
        """Request bytes: serialized generated messages (3 cases in 7) and malformed bytes: random bytes,
        truncated or bit-flipped serializations, serializations with a field of the wrong wire type, invalid
        UTF-8 in a string, a length past the end or an overlong varint spliced in."""
        serialized = self.requests(descriptor, seeds).map(lambda m: m.SerializePartialToString(deterministic=True))
        return st.one_of(
            serialized,
            serialized,
            serialized,
            st.binary(max_size=200),
            _truncated(serialized),
            _bit_flipped(serialized),
            _spliced(serialized, _bad_fragment(descriptor)),
        )

    def case(self, method: pbd.MethodDescriptor, seeds: Sequence[Message] = ()) -> st.SearchStrategy:
        """One call's request of `method`: bytes, or a list of up to 4 of them when the client streams."""
        one = self.wire(method.input_type, seeds)
        return st.lists(one, max_size=4) if method.client_streaming else one


def method_path(method: pbd.MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def call_kind(method: pbd.MethodDescriptor) -> str:
    """The grpc.Channel factory of a method's shape."""
    return f"{'stream' if method.client_streaming else 'unary'}_{'stream' if method.server_streaming else 'unary'}"


def response_type(method: pbd.MethodDescriptor) -> type[Message]:
    return _message_class(method.output_type)


def _bend(t: tuple[str, int]) -> str:
    """A hint changed by one character (case, an extra letter, a dropped last letter), or as it is."""
    text, how = t
    if how == 1:
        return text.upper()
    if how == 2:
        return text + "x"
    if how == -1:
        return text[:-1]
    return text


@st.composite
def _fill(draw, strategies: ProtoStrategies, descriptor: pbd.Descriptor, depth: int) -> Message:
    message = _message_class(descriptor)()
    chosen = {}  # oneof name -> the one member set (or None)
    for oneof in descriptor.oneofs:
        chosen[oneof.name] = draw(st.sampled_from([None, *oneof.fields]))
    for fd in descriptor.fields:
        oneof = fd.containing_oneof
        if oneof is not None:
            if chosen[oneof.name] is not fd:
                continue
        elif not draw(st.booleans()):
            continue
        _set_field(draw, strategies, message, fd, depth)
    return message


def _count(draw, scalar: bool) -> int:
    """How many entries a repeated field or map gets: a few, sometimes (scalars only) many."""
    if scalar and draw(st.integers(0, 9)) == 0:
        return draw(st.integers(5, 64))
    return draw(st.integers(0, 3))


def _set_field(draw, strategies: ProtoStrategies, message: Message, fd: pbd.FieldDescriptor, depth: int) -> None:
    name = fd.name
    if _is_map(fd):
        key_fd, value_fd = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
        container = getattr(message, name)
        for _ in range(_count(draw, scalar=False)):
            key = draw(strategies.scalar(key_fd))
            if value_fd.type == value_fd.TYPE_MESSAGE:
                entry = container[key]
                if depth < MAX_DEPTH:
                    entry.CopyFrom(draw(strategies.message(value_fd.message_type, depth + 1)))
            else:
                _assign(lambda v, c=container, k=key: c.__setitem__(k, v), draw(strategies.scalar(value_fd)))
        return
    if _repeated(fd):
        container = getattr(message, name)
        if fd.type == fd.TYPE_MESSAGE:
            for _ in range(_count(draw, scalar=False)):
                item = container.add()
                if depth < MAX_DEPTH:
                    item.CopyFrom(draw(strategies.message(fd.message_type, depth + 1)))
        else:
            for _ in range(_count(draw, scalar=True)):
                _assign(container.append, draw(strategies.scalar(fd)))
        return
    if fd.type == fd.TYPE_MESSAGE:
        sub = getattr(message, name)
        if depth < MAX_DEPTH:
            sub.CopyFrom(draw(strategies.message(fd.message_type, depth + 1)))
        sub.SetInParent()  # present even when empty
        return
    _assign(lambda v: setattr(message, name, v), draw(strategies.scalar(fd)))


def _assign(setter: Callable, value) -> None:
    """Sets a value; a closed (proto2) enum refuses unknown numbers, and then the field stays as it was."""
    try:
        setter(value)
    except (ValueError, TypeError):
        pass


@st.composite
def _mutate(draw, strategies: ProtoStrategies, seed_message: Message) -> Message:
    descriptor = seed_message.DESCRIPTOR
    message = type(seed_message)()
    message.CopyFrom(seed_message)
    for fd, _ in seed_message.ListFields():
        if draw(st.integers(0, 4)) == 0:
            message.ClearField(fd.name)
    generated = draw(strategies.message(descriptor))
    for fd, _ in generated.ListFields():
        action = draw(st.sampled_from(("skip", "skip", "replace", "merge")))
        if action == "skip":
            continue
        only = type(seed_message)()
        only.CopyFrom(generated)
        for other, _ in generated.ListFields():
            if other is not fd:
                only.ClearField(other.name)
        if action == "replace":
            message.ClearField(fd.name)
        message.MergeFrom(only)
    return message


# malformed bytes


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


_WIRE_OF = {
    pbd.FieldDescriptor.TYPE_DOUBLE: 1,
    pbd.FieldDescriptor.TYPE_FIXED64: 1,
    pbd.FieldDescriptor.TYPE_SFIXED64: 1,
    pbd.FieldDescriptor.TYPE_FLOAT: 5,
    pbd.FieldDescriptor.TYPE_FIXED32: 5,
    pbd.FieldDescriptor.TYPE_SFIXED32: 5,
    pbd.FieldDescriptor.TYPE_STRING: 2,
    pbd.FieldDescriptor.TYPE_BYTES: 2,
    pbd.FieldDescriptor.TYPE_MESSAGE: 2,
}


def _payload(wire_type: int, draw) -> bytes:
    """A well-formed value of a wire type."""
    if wire_type == 0:
        return _varint(draw(st.sampled_from((0, 1, 2**31, 2**63, 2**64 - 1, 300))))
    if wire_type == 1:
        return draw(st.binary(min_size=8, max_size=8))
    if wire_type == 5:
        return draw(st.binary(min_size=4, max_size=4))
    data = draw(st.binary(max_size=16))
    return _varint(len(data)) + data


@st.composite
def _bad_fragment(draw, descriptor: pbd.Descriptor, depth: int = 0) -> bytes:
    """Bytes of one field that the message's type does not expect, possibly inside one of its sub-messages."""
    fields = list(descriptor.fields)
    kind = draw(
        st.sampled_from(
            (
                "wrong_wire_type",
                "bad_utf8",
                "past_end",
                "overlong_varint",
                "group",
                "bad_field_number",
                "garbage_submessage",
                "bad_packed",
                "nested",
            )
        )
    )
    fd = draw(st.sampled_from(fields)) if fields else None
    number = fd.number if fd is not None else 1
    expected = 0 if fd is None else (2 if _repeated(fd) and fd.type not in _WIRE_OF else _WIRE_OF.get(fd.type, 0))
    if kind == "wrong_wire_type":
        wire_type = draw(st.sampled_from([w for w in (0, 1, 2, 5) if w != expected]))
        return _key(number, wire_type) + _payload(wire_type, draw)
    if kind == "bad_utf8":
        strings = [f for f in fields if f.type == f.TYPE_STRING] or fields
        if strings:
            number = draw(st.sampled_from(strings)).number
        data = draw(st.sampled_from((b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"a\xfe", b"\xf4\x90\x80\x80", b"\x80")))
        return _key(number, 2) + _varint(len(data)) + data
    if kind == "past_end":
        return _key(number, 2) + _varint(draw(st.sampled_from((5, 2**31 - 1, 2**32, 2**63)))) + b"abc"
    if kind == "overlong_varint":
        return _key(number, 0) + b"\xff" * draw(st.integers(10, 12)) + b"\x01"
    if kind == "group":
        return _key(number, draw(st.sampled_from((3, 4)))) + draw(st.binary(max_size=4))
    if kind == "bad_field_number":
        bad = draw(st.sampled_from((0, 19_000, 19_999, 2**29 - 1, 2**29, 2**32 - 1)))
        return _key(bad, draw(st.sampled_from((0, 2)))) + b"\x01\x00"
    if kind == "garbage_submessage":
        messages = [f for f in fields if f.type == f.TYPE_MESSAGE] or fields
        if messages:
            number = draw(st.sampled_from(messages)).number
        data = draw(st.binary(min_size=1, max_size=24))
        return _key(number, 2) + _varint(len(data)) + data
    if kind == "bad_packed":
        packable = [f for f in fields if _repeated(f) and f.type not in (f.TYPE_STRING, f.TYPE_BYTES, f.TYPE_MESSAGE)]
        if packable:
            number = draw(st.sampled_from(packable)).number
        data = b"\xff\xff\xff"  # a varint cut short, or 3 bytes of fixed32/64
        return _key(number, 2) + _varint(len(data)) + data
    messages = [f for f in fields if f.type == f.TYPE_MESSAGE and not _is_map(f)]
    if not messages or depth >= 2:
        return _key(number, 0) + b"\x80"  # a varint cut short at the end
    sub = draw(st.sampled_from(messages))
    inner = draw(_bad_fragment(sub.message_type, depth + 1))
    return _key(sub.number, 2) + _varint(len(inner)) + inner


@st.composite
def _truncated(draw, serialized: st.SearchStrategy[bytes]) -> bytes:
    data = draw(serialized)
    if not data:
        return b"\x0a"
    return data[: draw(st.integers(0, len(data) - 1))]


@st.composite
def _bit_flipped(draw, serialized: st.SearchStrategy[bytes]) -> bytes:
    data = bytearray(draw(serialized) or b"\x08\x01")
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data) - 1))
        how = draw(st.sampled_from(("flip", "ff", "00", "80")))
        if how == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        else:
            data[position] = int(how, 16)
    return bytes(data)


@st.composite
def _spliced(draw, serialized: st.SearchStrategy[bytes], fragment: st.SearchStrategy[bytes]) -> bytes:
    data, bad = draw(serialized), draw(fragment)
    where = draw(st.sampled_from(("end", "start", "twice")))
    if where == "start":
        return bad + data
    if where == "twice":
        return data + bad + bad
    return data + bad


# -- calls and their checks ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    method: str
    code: grpc.StatusCode
    details: str
    elapsed: float
    responses: list[bytes]


@dataclass
class Finding:
    method: str
    code: str
    problem: str
    details: str
    request: object  # bytes, or a list of bytes for a stream
    count: int = 1
    fatal: bool = True  # False: a note, reported without failing the target

    def size(self) -> int:
        return len(self.request) if isinstance(self.request, bytes) else sum(map(len, self.request))


@dataclass
class TargetStats:
    name: str
    cases: int = 0
    calls: int = 0
    seconds: float = 0.0
    codes: Counter = field(default_factory=Counter)
    findings: dict[tuple[str, str, str], Finding] = field(default_factory=dict)
    hangs: int = 0


STATS: dict[str, TargetStats] = {}
_TARGETS = {"count": 0}


def _signature(details: str) -> str:
    """A finding's message without what changes between calls (incident ids, numbers, quoted values)."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", details or "")
    return re.sub(r"[0-9a-f]{12}|\d+", "N", text)[:120]


def _raw(channel: grpc.Channel, kind: str, method: str):
    return getattr(channel, kind)(method, request_serializer=None, response_deserializer=None)


class Fuzzer:
    """Runs a target's cases and checks every call it makes (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self.stats = STATS.setdefault(name, TargetStats(name))
        self._stop = False
        self._until = math.inf
        self._services: list = []

    # running

    def run(self, strategy: st.SearchStrategy, body: Callable[[object], None], services: Sequence = ()) -> TargetStats:
        """Runs `body(case)` for generated cases: EXAMPLES of them from a fixed seed, or random batches for this
        target's share of MODELGRID_FUZZ_SECONDS. Fails at the end with every distinct finding, and when one of
        `services` (ServiceProcess) is no longer running; their logs explain INTERNAL answers in the report."""
        started = time.monotonic()
        self._services = list(services)

        def case(value) -> None:
            if self._stop or time.monotonic() > self._until:
                return
            self.stats.cases += 1
            body(value)

        if SECONDS is None:
            target_seed = zlib.crc32(self.stats.name.encode())
            seed(target_seed)(settings(_BASE_SETTINGS, max_examples=EXAMPLES)(given(strategy)(case)))()
        else:
            self._until = started + SECONDS / max(_TARGETS["count"], 1)
            while time.monotonic() < self._until and not self._stop:
                runs = settings(_BASE_SETTINGS, max_examples=BATCH)
                runs(given(strategy)(case))()
        self.stats.seconds += time.monotonic() - started
        crashed = [f"{p.module} exited with {p.process.returncode}" for p in self._services if not p.running()]
        if crashed or any(f.fatal for f in self.stats.findings.values()):
            pytest.fail("\n".join([*crashed, report(self.stats, self._services)]), pytrace=False)
        return self.stats

    # calls

    def call_method(
        self, channel: grpc.Channel, method: pbd.MethodDescriptor, request: bytes | Sequence[bytes], **options
    ) -> Outcome:
        """`call` for a method descriptor: its path, its shape, its response type."""
        options.setdefault("response_type", response_type(method))
        return self.call(channel, method_path(method), request, kind=call_kind(method), **options)

    def call(
        self,
        channel: grpc.Channel,
        method: str,
        request: bytes | Sequence[bytes],
        *,
        kind: str = "unary_unary",
        timeout: float = 10.0,
        metadata: Sequence[tuple[str, str]] = (),
        response_type: type[Message] | None = None,
        max_responses: int | None = None,
        allow: Iterable[grpc.StatusCode] = (),
        allow_details: dict[grpc.StatusCode, str] | None = None,
        deadline_is_ours: bool = False,
    ) -> Outcome:
        """One raw call of `method` (`kind` as grpc.Channel names them), checked:

        - its code is OK, a client error, or one in `allow` (any message), or one in `allow_details` whose message
          matches the pattern given (e.g. UNAVAILABLE "no instance": an outage the service documents);
          DEADLINE_EXCEEDED only when `deadline_is_ours` (a stream that does not end by itself);
        - it ended within its deadline (plus SLACK_S): no hang;
        - every response parses as `response_type`.
        A server stream is read to its end, or cancelled by us after `max_responses` messages (which is OK)."""
        started = time.monotonic()
        responses: list[bytes] = []
        code, details = grpc.StatusCode.OK, ""
        try:
            if kind == "unary_unary":
                responses.append(_raw(channel, kind, method)(request, timeout=timeout, metadata=metadata))
            elif kind == "stream_unary":
                responses.append(_raw(channel, kind, method)(iter(request), timeout=timeout, metadata=metadata))
            else:
                payload = iter(request) if kind == "stream_stream" else request
                stream = _raw(channel, kind, method)(payload, timeout=timeout, metadata=metadata)
                try:
                    for message in stream:
                        responses.append(message)
                        if max_responses is not None and len(responses) >= max_responses:
                            break
                finally:
                    stream.cancel()  # nothing when it ended; ours when we stopped reading
        except grpc.RpcError as err:
            code, details = err.code(), err.details() or ""
        elapsed = time.monotonic() - started
        self.stats.calls += 1
        self.stats.codes[code.name] += 1
        outcome = Outcome(method, code, details, elapsed, responses)

        problem = note = None
        if elapsed > timeout + SLACK_S:
            problem = f"hang: answered after {elapsed:.1f}s, deadline {timeout:g}s"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED and not deadline_is_ours:
            problem = f"hang: no answer within the {timeout:g}s deadline"
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and "metadata size exceeds" in details:
            # The server put so much into the answer's trailers (an error message echoing a huge field) that gRPC
            # clients drop it: the caller gets this instead of the server's status. A client error code, so a
            # note in the summary rather than a failure.
            note = "answer unreadable: its metadata exceeds gRPC's limit"
        elif code == grpc.StatusCode.INTERNAL and details == CORE_RACE:
            # A grpc.aio client (the gateway's, forwarding a stream) whose write failed because the backend had
            # just ended the call sets the call's status to this INTERNAL, in place of the backend's. The gateway
            # keeps the backend's status (services/gateway/call_status.py): seeing this again is a regression.
            problem = "status INTERNAL: grpc.aio's status for a failed write replaced the backend's answer"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED or code == grpc.StatusCode.OK or code in CLIENT_ERRORS:
            pass
        elif code in set(allow):
            pass
        elif allow_details and code in allow_details and re.search(allow_details[code], details):
            pass
        else:
            problem = f"status {code.name}"
        if problem is None and response_type is not None:
            for message in responses:
                try:
                    response_type.FromString(message)
                except Exception:  # noqa: BLE001 - DecodeError or RuntimeError, by protobuf backend
                    problem = f"a response does not parse as {response_type.DESCRIPTOR.full_name}"
                    break
        if problem is not None:
            self.record(f"{method} ({kind})", code.name, details, problem, request)
        elif note is not None:
            self.record(f"{method} ({kind})", code.name, details, note, request, fatal=False)
        return outcome

    def record(self, method: str, code: str, details: str, problem: str, request, fatal: bool = True) -> None:
        """Keeps a finding: one per (method, problem kind, code, message shape), with the smallest request seen."""
        kind = problem.split(":")[0]
        key = (method, f"{kind}:{code}", _signature(details))
        request = bytes(request) if isinstance(request, bytes | bytearray) else [bytes(r) for r in request]
        candidate = Finding(method, code, problem, details, request, fatal=fatal)
        found = self.stats.findings.get(key)
        if found is None:
            self.stats.findings[key] = candidate
        else:
            found.count += 1
            if candidate.size() < found.size():
                found.request, found.details = request, details
        if kind == "hang":
            self.stats.hangs += 1
            if self.stats.hangs >= MAX_HANGS:
                self._stop = True


def report(stats: TargetStats, services: Sequence = (), fatal: bool = True) -> str:
    """A target's findings with their smallest requests and, for INTERNAL, the cause from the logs (or its notes,
    shorter)."""
    findings = [f for f in stats.findings.values() if f.fatal == fatal]
    what = "finding(s)" if fatal else "note(s)"
    lines = [f"{len(findings)} {what} in {stats.name} ({stats.cases} cases):"]
    for f in findings:
        if not fatal:
            lines.append(f"- {f.method}: {f.problem} ({f.code}: {f.details[:120]!r}), {f.count}x")
            continue
        lines.append(f"- {f.method}: {f.problem} ({f.code}: {f.details[:300]!r}), {f.count}x; smallest request:")
        lines.append(f"    {_shown(f.request)}")
        cause = _cause(f.details, services)
        if cause:
            lines.append(f"    server log: {cause}")
    return "\n".join(lines)


def _cause(details: str, services: Sequence) -> str:
    """Where an INTERNAL answer's incident was raised and why, from the service logs: the innermost frame in
    services/ and the exception line."""
    incident = re.search(r"incident ([0-9a-f]{12})", details or "")
    if not incident:
        return ""
    for process in services:
        try:
            text = process.log_path.read_text(errors="replace")
        except OSError:
            continue
        at = text.find(f"incident {incident.group(1)})")
        if at < 0:
            continue
        record = re.split(r"\n(?=\d{4}-\d\d-\d\d )", text[at:], maxsplit=1)[0].splitlines()
        frames = [line.strip() for line in record if line.strip().startswith('File "') and "/services/" in line]
        exception = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b")
        error = next((line for line in reversed(record) if exception.match(line)), "")
        return f"{frames[-1] if frames else '?'}: {error.strip()[:300]}"
    return ""


def _shown(request) -> str:
    """A request for a report: bytes as a Python literal (long ones cut, with their length and sha256)."""

    def one(data: bytes) -> str:
        if len(data) <= 600:
            return repr(data)
        return f"{data[:300]!r}... ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]})"

    if isinstance(request, bytes):
        return one(request)
    return "[" + ", ".join(one(r) for r in request) + "]"


# -- services --------------------------------------------------------------------------------------------------


def assert_healthy(process, channel: grpc.Channel) -> None:
    """The process is alive and its gRPC health check answers SERVING."""
    assert process.running(), f"{process.module} exited with {process.process.returncode}"
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING, f"{process.module} is {reply.status}"


def crashed_services(*processes) -> list[str]:
    """Modules of the given processes that are no longer running."""
    return [p.module for p in processes if not p.running()]


# -- fixtures and hooks ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def protofuzz() -> Callable[..., ProtoStrategies]:
    """`protofuzz(hints=(), byte_hints=())`: strategies for any protobuf Descriptor (`.message`, `.requests`,
    `.wire`, `.mutated`, `.strings`, `.binaries`)."""
    return ProtoStrategies


@pytest.fixture
def fuzz(request) -> Fuzzer:
    """The target's runner and call checker: `fuzz.run(strategy, body)`, `fuzz.call(channel, method, bytes, ...)`."""
    return Fuzzer(f"{request.node.path.stem}::{request.node.name}")


MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""What the services send at most (max_send_message_bytes): the fuzz channels read answers up to that size, so that
an answer between gRPC's default 4 MiB and that is never mistaken for a failure."""


def fuzz_channel(process: ServiceProcess) -> grpc.Channel:
    return process.channel(
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", -1)]
    )


@pytest.fixture(scope="session")
def channel_to() -> Callable[[ServiceProcess], grpc.Channel]:
    """`channel_to(process)`: a channel for fuzz calls to a service (as `operator` with internal TLS), reading
    answers up to the services' own send limit."""
    return fuzz_channel


@pytest.fixture(scope="session")
def service_health() -> Callable:
    """`service_health(process, channel)`: asserts the process is alive and SERVING."""
    return assert_healthy


def pytest_collection_modifyitems(session, config, items) -> None:
    _TARGETS["count"] = sum(1 for item in items if "fuzz" in getattr(item, "fixturenames", ()))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not STATS:
        return
    mode = f"{EXAMPLES} examples per target" if SECONDS is None else f"{SECONDS:g}s over {_TARGETS['count']} targets"
    terminalreporter.section(f"fuzz targets ({mode})")
    for stats in STATS.values():
        codes = ", ".join(f"{name} {count}" for name, count in stats.codes.most_common())
        fatal = sum(f.fatal for f in stats.findings.values())
        terminalreporter.write_line(
            f"{stats.name}: {stats.cases} cases, {stats.calls} calls, {stats.seconds:.1f}s, "
            f"{fatal} findings, {len(stats.findings) - fatal} notes; {codes}"
        )
    notes = [stats for stats in STATS.values() if any(not f.fatal for f in stats.findings.values())]
    if notes:
        terminalreporter.section("fuzz notes (client errors, but worth a look)")
        for stats in notes:
            terminalreporter.write_line(report(stats, fatal=False))
