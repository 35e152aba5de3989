"""gRPC-Web framing as pure functions: request frame parsing (binary and base64 text, fed in arbitrary chunks),
message and trailer frame encoding, status-message percent-encoding, `grpc-timeout` and metadata conversion.

A gRPC-Web body is a sequence of frames: one flag byte (0x00 message, 0x80 trailers; bit 0 = compressed), a
4-byte big-endian length, then the payload. The trailer frame's payload is HTTP/1-style header lines
("grpc-status: 0\\r\\ngrpc-message: ...\\r\\n"). In text mode (`application/grpc-web-text`) the bytes travel base64
encoded; a sender may pad each of its writes separately, so text is decoded in whole 4-character quanta.
"""

import base64
import binascii
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

MESSAGE_FLAG = 0x00
COMPRESSED_FLAG = 0x01
TRAILER_FLAG = 0x80
HEADER = struct.Struct(">BI")
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_TIMEOUT = re.compile(r"^(\d{1,8})([HMSmun])$")
_TIMEOUT_UNIT_SECONDS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_METADATA_KEY = re.compile(r"^[0-9a-z_.-]+$")
_METADATA_VALUE = re.compile(r"[\x20-\x7e]*")
"""What gRPC takes as an ASCII metadata value: printable ASCII and spaces."""
# Request headers that belong to HTTP or the browser, not to the call: never passed on as gRPC metadata.
HTTP_ONLY_HEADERS = frozenset(
    """host connection keep-alive proxy-connection transfer-encoding upgrade content-length http2-settings accept
    accept-encoding accept-language accept-charset origin referer cookie pragma cache-control dnt priority
    grpc-timeout""".split()
)


class FrameError(ValueError):
    """The request body is not a valid gRPC-Web frame sequence."""


class FrameTooLarge(FrameError):
    """A request frame announces more bytes than the limit (gRPC's RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True)
class Frame:
    flags: int
    payload: bytes

    @property
    def is_trailers(self) -> bool:
        return bool(self.flags & TRAILER_FLAG)


def _b64decode_quanta(text: bytes) -> bytes:
    """Decodes base64 whose length is a multiple of 4 and whose padded quanta may sit mid-stream."""
    out: list[bytes] = []
    start = 0
    while start < len(text):
        pad = text.find(b"=", start)
        end = len(text) if pad < 0 else start + ((pad - start) // 4 + 1) * 4
        try:
            out.append(binascii.a2b_base64(text[start:end], strict_mode=True))
        except binascii.Error as exc:
            raise FrameError(f"invalid base64 in a grpc-web-text body: {exc}") from None
        start = end
    return b"".join(out)


class FrameDecoder:
    """Incremental frame parser: `feed()` any chunk of the body, get back the frames it completed; `close()` at
    the end of the body raises FrameError if a frame was cut short."""

    def __init__(self, *, text: bool = False, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self._text = text
        self._max = max_message_bytes
        self._pending_text = b""
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        if self._text:
            data = b"".join(self._pending_text.split()) + b"".join(data.split())  # ignore line breaks
            whole = len(data) - len(data) % 4
            self._pending_text = data[whole:]
            data = _b64decode_quanta(data[:whole])
        self._buffer += data
        frames: list[Frame] = []
        while len(self._buffer) >= HEADER.size:
            flags, length = HEADER.unpack_from(self._buffer)
            if length > self._max:
                raise FrameTooLarge(f"a message of {length} bytes exceeds the limit of {self._max}")
            if len(self._buffer) < HEADER.size + length:
                break
            frames.append(Frame(flags, bytes(self._buffer[HEADER.size : HEADER.size + length])))
            del self._buffer[: HEADER.size + length]
        return frames

    def close(self) -> None:
        if self._pending_text:
            raise FrameError("the grpc-web-text body ends inside a base64 quantum")
        if self._buffer:
            raise FrameError(f"the body ends inside a frame ({len(self._buffer)} bytes left over)")


def decode_frames(body: bytes, *, text: bool = False) -> list[Frame]:
    """Every frame of a complete body."""
    decoder = FrameDecoder(text=text)
    frames = decoder.feed(body)
    decoder.close()
    return frames


def encode_frame(payload: bytes, flags: int = MESSAGE_FLAG) -> bytes:
    return HEADER.pack(flags, len(payload)) + payload


def encode_message(data: bytes) -> bytes:
    """A message frame (uncompressed)."""
    return encode_frame(data, MESSAGE_FLAG)


def percent_encode(message: str) -> str:
    """grpc-message encoding: UTF-8, with '%' and bytes outside printable ASCII as %XX."""
    return "".join(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in message.encode())


def percent_decode(value: str) -> str:
    raw = re.sub(rb"%([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]), value.encode())
    return raw.decode(errors="replace")


def header_value(key: str, value: str | bytes) -> str:
    """A metadata value as text: `-bin` (bytes) values are base64 without padding, as gRPC sends them."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode().rstrip("=")
    return value


def encode_trailers(code: int, message: str, trailers: Iterable[tuple[str, str | bytes]] = ()) -> bytes:
    """The final frame: grpc-status, grpc-message (percent-encoded) and the call's other trailers."""
    lines = [f"grpc-status: {code}"]
    if message:
        lines.append(f"grpc-message: {percent_encode(message)}")
    for key, value in trailers:
        key = key.lower()
        if key not in ("grpc-status", "grpc-message") and _METADATA_KEY.match(key):
            lines.append(f"{key}: {header_value(key, value)}")
    return encode_frame(("".join(f"{line}\r\n" for line in lines)).encode("latin-1", "replace"), TRAILER_FLAG)


def decode_trailers(payload: bytes) -> dict[str, str]:
    """A trailer frame's payload as a dict (lower-case names; grpc-message percent-decoded)."""
    trailers: dict[str, str] = {}
    for line in payload.decode("latin-1").split("\r\n"):
        if ":" in line:
            key, value = line.split(":", 1)
            trailers[key.strip().lower()] = value.strip()
    if "grpc-message" in trailers:
        trailers["grpc-message"] = percent_decode(trailers["grpc-message"])
    return trailers


def text_encode(frame: bytes) -> bytes:
    """One frame for a grpc-web-text response (each write padded on its own, as gRPC-Web clients expect)."""
    return base64.b64encode(frame)


def parse_timeout(value: str | None) -> float | None:
    """Seconds of a `grpc-timeout` value ("2S", "500m", "1H"...); None when absent; FrameError when malformed."""
    if not value:
        return None
    match = _TIMEOUT.match(value.strip())
    if match is None:
        raise FrameError(f"invalid grpc-timeout {value!r}: expected up to 8 digits and one of H M S m u n")
    return int(match.group(1)) * _TIMEOUT_UNIT_SECONDS[match.group(2)]


def request_metadata(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str | bytes]]:
    """HTTP request headers as gRPC metadata: HTTP/browser-only headers (HTTP_ONLY_HEADERS, `sec-*`,
    `access-control-*`) and names or values gRPC does not allow are left out; `-bin` values are base64-decoded to
    bytes."""
    metadata: list[tuple[str, str | bytes]] = []
    for key, value in headers:
        key = key.lower()
        if key in HTTP_ONLY_HEADERS or key.startswith(("sec-", "access-control-")) or not _METADATA_KEY.match(key):
            continue
        if key.endswith("-bin"):
            try:
                metadata.append((key, base64.b64decode(value + "=" * (-len(value) % 4))))
            except ValueError:  # binascii.Error, and non-ASCII text
                continue
        elif _METADATA_VALUE.fullmatch(value):
            metadata.append((key, value))  # (gRPC refuses other values: they are left out, as illegal names are)
    return metadata
