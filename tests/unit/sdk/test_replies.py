"""The client library's conversions of what it sends and receives, without a server: OIP replies that do not hold
what they say are InvalidArgument (never a KeyError or a numpy error), and batch jobs go out in bounded messages."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from modelgrid.client.errors import InvalidArgument
from modelgrid.client.predictor import MESSAGE_BYTES, batch_requests

OIP_CHECKS = textwrap.dedent(
    """
    from modelgrid.client.errors import InvalidArgument
    from modelgrid.client.oip import inference_of
    from modelgrid.oip import grpc_service_pb2 as oip

    Output = oip.ModelInferResponse.InferOutputTensor
    bad = [
        Output(name="half", datatype="FP16", shape=[2]),
        Output(name="bf", datatype="BF16", shape=[2]),
        Output(name="short", datatype="FP32", shape=[3], contents=oip.InferTensorContents(fp32_contents=[1, 2])),
        Output(name="odd", datatype="COMPLEX64", shape=[1]),
        Output(name="raw", datatype="FP32", shape=[2]),
    ]
    for tensor in bad:
        raw = [b"\\x00" * 5] if tensor.name == "raw" else []
        try:
            inference_of(oip.ModelInferResponse(outputs=[tensor], raw_output_contents=raw))
        except InvalidArgument as exc:
            print("refused", tensor.name, "|", exc)
    good = Output(name="s", datatype="BYTES", shape=[2], contents=oip.InferTensorContents(bytes_contents=[b"a", b"b"]))
    print("strings", inference_of(oip.ModelInferResponse(outputs=[good])).outputs["s"].tolist())
    """
)


def test_oip_replies_that_do_not_hold_their_shape_are_invalid_argument():
    """In a process of its own: the OIP messages may not be loaded beside tritonclient.grpc, which other unit test
    modules import."""
    result = subprocess.run([sys.executable, "-c", OIP_CHECKS], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    refused = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("refused")]
    assert refused == ["half", "bf", "short", "odd", "raw"], result.stdout
    assert "strings [b'a', b'b']" in result.stdout


def test_batch_records_go_in_messages_of_bounded_size():
    rows = np.zeros((100, 128 * 1024), np.float32)  # 512 KiB a record
    messages = list(batch_requests("m", {"x": rows}))
    assert messages[0].WhichOneof("payload") == "spec"
    sizes = [len(m.records.inputs["x"].raw_data) for m in messages[1:]]
    assert sum(sizes) == rows.nbytes and max(sizes) <= MESSAGE_BYTES
    big = np.zeros((3, MESSAGE_BYTES), np.uint8)  # a record over the bound still travels, one per message
    assert len(list(batch_requests("m", {"x": big}))) == 4
    with pytest.raises(InvalidArgument, match="same first dimension"):
        batch_requests("m", {"x": rows, "y": rows[:2]})
