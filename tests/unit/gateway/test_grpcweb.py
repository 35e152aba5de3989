"""Unit tests of the gRPC-Web framing (services/gateway/grpcweb.py): no servers."""

import base64
import struct

import pytest

from services.gateway import grpcweb
from services.gateway.grpcweb import FrameDecoder, FrameError


def frames_of(decoder: FrameDecoder, chunks) -> list[grpcweb.Frame]:
    out = []
    for chunk in chunks:
        out += decoder.feed(chunk)
    decoder.close()
    return out


def test_message_frame_layout():
    assert grpcweb.encode_message(b"abc") == b"\x00\x00\x00\x00\x03abc"
    assert grpcweb.encode_message(b"") == b"\x00\x00\x00\x00\x00"
    assert struct.unpack(">BI", grpcweb.encode_message(b"x" * 70000)[:5]) == (0, 70000)


def test_binary_frames_split_at_every_byte():
    body = grpcweb.encode_message(b"first") + grpcweb.encode_message(b"") + grpcweb.encode_message(b"third" * 100)
    frames = frames_of(FrameDecoder(), [body[i : i + 1] for i in range(len(body))])
    assert [f.payload for f in frames] == [b"first", b"", b"third" * 100]
    assert all(f.flags == grpcweb.MESSAGE_FLAG and not f.is_trailers for f in frames)


def test_binary_frames_in_one_chunk():
    body = b"".join(grpcweb.encode_message(bytes([i]) * i) for i in range(10))
    assert [len(f.payload) for f in grpcweb.decode_frames(body)] == list(range(10))


def test_truncated_body_is_an_error():
    decoder = FrameDecoder()
    assert decoder.feed(grpcweb.encode_message(b"hello")[:-1]) == []
    with pytest.raises(FrameError, match="ends inside a frame"):
        decoder.close()
    with pytest.raises(FrameError):
        grpcweb.decode_frames(b"\x00\x00")


def test_oversize_frame_refused_before_its_bytes():
    decoder = FrameDecoder(max_message_bytes=10)
    with pytest.raises(grpcweb.FrameTooLarge, match="exceeds"):  # a FrameError the web front says is too big
        decoder.feed(struct.pack(">BI", 0, 11))
    assert FrameDecoder(max_message_bytes=10).feed(struct.pack(">BI", 0, 10) + b"x" * 10)[0].payload == b"x" * 10


@pytest.mark.parametrize("step", [1, 2, 3, 4, 5, 7, 13, 1000])
def test_text_mode_decodes_chunks_not_aligned_with_frames_or_quanta(step):
    body = grpcweb.encode_message(b"\xff\xfe hello \x00") + grpcweb.encode_message(b"w" * 301)
    text = base64.b64encode(body)
    frames = frames_of(FrameDecoder(text=True), [text[i : i + step] for i in range(0, len(text), step)])
    assert [f.payload for f in frames] == [b"\xff\xfe hello \x00", b"w" * 301]


def test_text_mode_accepts_separately_padded_writes():
    one, two = grpcweb.encode_message(b"ab"), grpcweb.encode_message(b"bcdefgh")
    text = base64.b64encode(one) + base64.b64encode(two)  # "...==" in the middle
    assert b"=" in base64.b64encode(one)
    assert [f.payload for f in grpcweb.decode_frames(text, text=True)] == [b"ab", b"bcdefgh"]
    # the same through the response encoder
    text = grpcweb.text_encode(one) + grpcweb.text_encode(grpcweb.encode_trailers(0, ""))
    frames = grpcweb.decode_frames(text, text=True)
    assert frames[0].payload == b"ab" and frames[1].is_trailers


def test_text_mode_errors():
    with pytest.raises(FrameError, match="base64"):
        FrameDecoder(text=True).feed(b"AA*A")
    decoder = FrameDecoder(text=True)
    decoder.feed(base64.b64encode(grpcweb.encode_message(b"xy"))[:-1])
    with pytest.raises(FrameError, match="quantum"):
        decoder.close()


def test_trailer_frame():
    frame = grpcweb.encode_trailers(5, "no model 'x' — 100% gone", [("x-extra", "1"), ("detail-bin", b"\x00\x01\xff")])
    assert frame[0] == grpcweb.TRAILER_FLAG
    (parsed,) = grpcweb.decode_frames(frame)
    assert parsed.is_trailers
    raw = parsed.payload.decode()
    assert raw.startswith("grpc-status: 5\r\ngrpc-message: no model 'x' %E2%80%94 100%25 gone\r\n")
    assert raw.endswith("\r\n")
    trailers = grpcweb.decode_trailers(parsed.payload)
    assert trailers["grpc-status"] == "5"
    assert trailers["grpc-message"] == "no model 'x' — 100% gone"
    assert trailers["x-extra"] == "1"
    assert base64.b64decode(trailers["detail-bin"] + "==") == b"\x00\x01\xff"


def test_trailer_frame_ok_has_no_message_and_never_duplicates_status():
    frame = grpcweb.encode_trailers(0, "", [("grpc-status", "3"), ("Bad Name", "x")])
    assert grpcweb.decode_frames(frame)[0].payload == b"grpc-status: 0\r\n"


def test_percent_encoding_round_trip():
    for message in ["plain", "100%", "line\nbreak", "ünïcødé ✓", ""]:
        encoded = grpcweb.percent_encode(message)
        assert all(0x20 <= ord(c) <= 0x7E for c in encoded)
        assert grpcweb.percent_decode(encoded) == message
    assert grpcweb.percent_decode("50%") == "50%"  # a stray '%' is kept


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("2S", 2.0), ("1H", 3600.0), ("3M", 180.0), ("500m", 0.5), ("250u", 0.00025), ("7n", 7e-9), (None, None)],
)
def test_parse_timeout(value, seconds):
    assert grpcweb.parse_timeout(value) == pytest.approx(seconds) if seconds else grpcweb.parse_timeout(value) is None


@pytest.mark.parametrize("value", ["2", "S", "123456789S", "2s", "1.5S", "-1S"])
def test_parse_timeout_rejects(value):
    with pytest.raises(FrameError):
        grpcweb.parse_timeout(value)


def test_request_metadata_keeps_call_headers_only():
    headers = [
        ("host", "example"),
        ("origin", "http://x"),
        ("cookie", "a=b"),
        ("sec-fetch-mode", "cors"),
        ("grpc-timeout", "2S"),
        ("Authorization", "Bearer k"),
        ("x-request-id", "r1"),
        ("trace-bin", base64.b64encode(b"\x01\x02").decode().rstrip("=")),
        ("bad header", "x"),
    ]
    assert grpcweb.request_metadata(headers) == [
        ("authorization", "Bearer k"),
        ("x-request-id", "r1"),
        ("trace-bin", b"\x01\x02"),
    ]


def test_header_value():
    assert grpcweb.header_value("k", "v") == "v"
    assert grpcweb.header_value("k-bin", b"\xff\xfe") == "//4"
