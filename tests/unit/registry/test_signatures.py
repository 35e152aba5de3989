"""The registry reads a SavedModel's signatures with its own subset of TensorFlow's messages: the same signatures
TensorFlow's full messages give, and no TensorFlow import in the registry's process."""

import subprocess
import sys

import pytest

from modelgrid.client.artifacts import pack_to_file
from modelgrid.client.errors import InvalidArgument
from services.registry.signatures import read_signatures


@pytest.fixture(scope="module")
def model_tar(tmp_path_factory, build_saved_model):
    tmp = tmp_path_factory.mktemp("signatures")
    directory = build_saved_model(tmp / "model", seed=5)
    pack_to_file(directory, tmp / "model.tar")
    return directory, tmp / "model.tar"


def test_the_subset_reads_what_tensorflow_reads(model_tar):
    from tensorflow.core.protobuf import saved_model_pb2  # the test may import TensorFlow; the registry does not

    directory, tar = model_tar
    full = saved_model_pb2.SavedModel.FromString((directory / "saved_model.pb").read_bytes())
    (graph,) = full.meta_graphs
    expected = {
        key: (
            sig.method_name,
            {name: (info.dtype, [d.size for d in info.tensor_shape.dim]) for name, info in sig.inputs.items()},
            {name: (info.dtype, [d.size for d in info.tensor_shape.dim]) for name, info in sig.outputs.items()},
        )
        for key, sig in graph.signature_def.items()
        if not key.startswith("__")
    }
    got = read_signatures(tar)
    assert [s.name for s in got] == sorted(expected)
    for signature in got:
        method, inputs, outputs = expected[signature.name]
        assert signature.method_name == method
        assert {t.name: t.shape for t in signature.inputs} == {k: v[1] for k, v in inputs.items()}
        assert {t.name: t.shape for t in signature.outputs} == {k: v[1] for k, v in outputs.items()}
        assert all(t.dtype == "float32" for t in [*signature.inputs, *signature.outputs])  # DT_FLOAT = 1


def test_the_registry_reads_signatures_without_importing_tensorflow(model_tar):
    _, tar = model_tar
    code = (
        "import sys\n"
        "import services.registry.main\n"
        "from services.registry.signatures import read_signatures\n"
        f"assert read_signatures({str(tar)!r})\n"
        "print(sorted(m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_protobuf_that_is_not_a_savedmodel_is_refused(tmp_path):
    import tarfile

    junk = tmp_path / "saved_model.pb"
    junk.write_bytes(b"\xff\xff\xff\xff not a protobuf")
    with tarfile.open(tmp_path / "junk.tar", "w") as archive:
        archive.add(junk, arcname="saved_model.pb")
    with pytest.raises(InvalidArgument, match="not a valid SavedModel protobuf"):
        read_signatures(tmp_path / "junk.tar")
