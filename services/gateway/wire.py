"""Just enough of the protobuf wire format to read a model name out of a request and to redirect it, without
decoding messages the gateway otherwise only forwards as bytes.

Appending a field to a serialized message is a valid way to change it: for a scalar the last value wins, and
an embedded message is merged (in a oneof, the field set last wins).
"""

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def last_field(data: bytes, number: int) -> bytes | None:
    """The bytes of the last length-delimited field `number` (a string or an embedded message), or None.
    Raises ValueError on malformed input."""
    return last_fields(data, (number,))[0]


def last_fields(data: bytes, numbers: tuple[int, ...]) -> list[bytes | None]:
    """`last_field` of each of `numbers`, in one pass over the message."""
    pos, found = 0, [None] * len(numbers)
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, pos = _varint(data, pos)
        elif wire == _I64:
            pos += 8
        elif wire == _I32:
            pos += 4
        elif wire == _LEN:
            length, pos = _varint(data, pos)
            if field in numbers:
                found[numbers.index(field)] = data[pos : pos + length]
            pos += length
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(data):
            raise ValueError("field runs past the end of the message")
    return found


def string_at(data: bytes, path: tuple[int, ...]) -> str:
    """The string at a path of field numbers (e.g. (1, 1): field 1 of the message in field 1); "" if absent."""
    return strings_at(data, path[:-1], (path[-1],))[0]


def strings_at(data: bytes, parent: tuple[int, ...], numbers: tuple[int, ...]) -> list[str]:
    """The strings of fields `numbers` of the message at path `parent` ("" for each absent), reading the message
    once."""
    for number in parent:
        value = last_field(data, number)
        if value is None:
            return [""] * len(numbers)
        data = value
    return ["" if v is None else v.decode("utf-8", errors="replace") for v in last_fields(data, numbers)]


def with_string(data: bytes, path: tuple[int, ...], value: str) -> bytes:
    """`data` with the string at `path` set to `value` (appended; the last value wins, embedded messages merge)."""
    payload = value.encode()
    for number in reversed(path):
        payload = _encode_varint(number << 3 | _LEN) + _encode_varint(len(payload)) + payload
    return data + payload
