"""An MLServer custom runtime serving a TensorFlow SavedModel's `serving_default` signature (for bench-peers).

Runs inside MLServer's own virtualenv (.bench/peers/mlserver), never in the project's. A model-settings.json names
it as `"implementation": "mlserver_runtime.SavedModelRuntime"` with `parameters.uri` the SavedModel directory and
`parameters.extra.tf_threads` TensorFlow's intra- and inter-op threads (0: TensorFlow's default). Inputs are
decoded by name with the NumPy codec (MLServer has already unpacked raw_input_contents), passed to the signature as
tensors of the same name, and every output goes back NumPy-encoded; MLServer answers raw when the request was raw.
With adaptive batching MLServer concatenates the requests' inputs along the first axis before predict() and splits
the outputs after it.
"""

import tensorflow as tf
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


def configure_threads(threads: int) -> None:
    if threads <= 0:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass  # a second model in the same process: TensorFlow is already initialised with these threads


class SavedModelRuntime(MLModel):
    async def load(self) -> bool:
        parameters = self.settings.parameters
        configure_threads(int((parameters.extra or {}).get("tf_threads", 0)))
        self._loaded = tf.saved_model.load(parameters.uri)
        self._signature = self._loaded.signatures["serving_default"]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        inputs = {i.name: tf.convert_to_tensor(NumpyCodec.decode_input(i)) for i in payload.inputs}
        outputs = self._signature(**inputs)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[NumpyCodec.encode_output(name, tensor.numpy()) for name, tensor in outputs.items()],
        )
