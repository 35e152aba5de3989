"""KServe's Python model server serving TensorFlow SavedModels' `serving_default` signatures (for bench-peers).

Runs inside KServe's own virtualenv (.bench/peers/kserve), never in the project's:

    python bench/peers/kserve_server.py --grpc_port P --http_port Q --enable_latency_logging false \
        --tf-threads 2 --savedmodel NAME=DIR [--savedmodel NAME=DIR ...]

The --grpc_port/--http_port/--enable_latency_logging flags are KServe's own (its model_server module parses the
command line when imported); the others are ours. Each model is a `kserve.Model` whose synchronous predict() (the
form KServe's docs show) decodes the request's inputs with InferInput.as_numpy() (raw_input_contents included),
calls the signature with them by name, and answers every output as raw bytes. Both servers (gRPC and REST) listen
on 127.0.0.1 only: KServe binds every interface by default, so the two bind calls are wrapped below. KServe's
per-request INFO logs (the gRPC logging interceptor) are turned off with its logger at WARNING.
"""

import argparse
import logging
from types import SimpleNamespace

import grpc
import tensorflow as tf
import uvicorn
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.protocol.grpc import server as kserve_grpc_server
from kserve.utils.numpy_codec import from_np_dtype


def _loopback_grpc_server(*args, **kwargs):
    server = grpc.aio.server(*args, **kwargs)
    add_insecure_port = server.add_insecure_port
    server.add_insecure_port = lambda address: add_insecure_port(address.replace("[::]", "127.0.0.1", 1))
    return server


_uvicorn_config_init = uvicorn.Config.__init__


def _loopback_uvicorn_config(self, app, *args, **kwargs):
    _uvicorn_config_init(self, app, *args, **{**kwargs, "host": "127.0.0.1"})


kserve_grpc_server.aio = SimpleNamespace(server=_loopback_grpc_server)
uvicorn.Config.__init__ = _loopback_uvicorn_config


class SavedModel(Model):
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path

    def load(self) -> bool:
        self._loaded = tf.saved_model.load(self.path)
        self._signature = self._loaded.signatures["serving_default"]
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        inputs = {i.name: tf.convert_to_tensor(i.as_numpy()) for i in payload.inputs}
        outputs = []
        for name, tensor in self._signature(**inputs).items():
            array = tensor.numpy()
            output = InferOutput(name=name, shape=list(array.shape), datatype=from_np_dtype(array.dtype))
            output.set_data_from_numpy(array, binary_data=True)
            outputs.append(output)
        return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tf-threads", type=int, default=0, help="TF intra- and inter-op threads (0: default)")
    parser.add_argument("--savedmodel", action="append", required=True, help="NAME=DIR, once per model")
    args, _ = parser.parse_known_args()  # the rest are KServe's own flags
    if args.tf_threads > 0:
        tf.config.threading.set_intra_op_parallelism_threads(args.tf_threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.tf_threads)
    models = []
    for spec in args.savedmodel:
        name, _, path = spec.partition("=")
        model = SavedModel(name, path)
        model.load()
        models.append(model)
    server = ModelServer()  # ports and options from KServe's own flags
    logging.getLogger("kserve").setLevel(logging.WARNING)
    server.start(models)


if __name__ == "__main__":
    main()
