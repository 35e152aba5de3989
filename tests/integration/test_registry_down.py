"""The registry down and back: a predictor keeps serving what it loaded (SERVING, every prediction answered), pushes
fail with UNAVAILABLE and a message saying what to do, and once a registry runs again on the same Redis and blob
dir a push succeeds and the predictor's event follower reconnects and serves the new version. Own Consul, so that
the predictor discovers only this test's registries."""

import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelgrid.client.errors import Unavailable
from modelgrid.client.tensors import tensor_to_array
from modelgrid.predictor.v1 import predictor_pb2_grpc
from services.cli.main import run
from services.kit.localinfra import ConsulAgent

pytestmark = pytest.mark.slow

X = np.array([[0.5, -1.0, 2.0, 0.1], [1.5, 0.3, -0.7, 2.2]], dtype=np.float32)
PREDICTIONS_WHILE_DOWN = 30


def health(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_predictors_serve_and_pushes_fail_cleanly_while_the_registry_is_down(
    internal_tls_dir,
    redis_server,
    tmp_path,
    launch,
    client_for,
    unique,
    build_saved_model,
    tf_reference,
    predict_request,
    capsys,
    monkeypatch,
):
    monkeypatch.setenv("TTY_COMPATIBLE", "0")  # the CLI's output as when piped
    model = unique("regdown")
    first, second = build_saved_model(tmp_path / "v1", seed=1), build_saved_model(tmp_path / "v2", seed=2)
    data_dir = tmp_path / "registry"
    started = []
    with ConsulAgent(tmp_path / "consul", tls_dir=internal_tls_dir) as consul:
        try:
            registry = launch.registry(consul.http_url, redis_server.url, data_dir)
            started.append(registry)
            channel, client = client_for(registry)
            client.ensure_model(model)
            assert client.push_savedmodel(model, first).version == 1
            channel.close()
            predictor = launch.predictor(
                consul.http_url, redis_server.url, tmp_path, [{"name": model, "latest": 1}], MAX_QUEUE_DELAY_MS="1"
            )
            started.append(predictor)
            predictor_channel = predictor.channel()
            started.append(predictor_channel)
            stub = predictor_pb2_grpc.PredictorStub(predictor_channel)

            def predict() -> tuple[int, np.ndarray]:
                reply = stub.Predict(predict_request(model, X), timeout=10)
                return reply.version, tensor_to_array(reply.outputs["y"])

            assert predict()[0] == 1

            # The registry goes away: every prediction is still answered by the loaded version, health stays SERVING.
            registry.stop()
            expected = tf_reference(first)(X)
            for _ in range(PREDICTIONS_WHILE_DOWN):
                version, y = predict()
                assert version == 1
                np.testing.assert_allclose(y, expected, rtol=1e-6)
                time.sleep(0.1)  # spread over the follower's reconnection attempts
            assert health(predictor_channel) == health_pb2.HealthCheckResponse.SERVING
            assert health(predictor_channel, f"model/{model}") == health_pb2.HealthCheckResponse.SERVING

            # Pushes fail cleanly: UNAVAILABLE, and a message that says what to do.
            channel, client = client_for(registry)
            with pytest.raises(Unavailable, match="retry when it is back") as caught:
                client.push_savedmodel(model, second, timeout=30)
            assert caught.value.__cause__.code() == grpc.StatusCode.UNAVAILABLE
            channel.close()
            capsys.readouterr()
            tls_dir = ["--tls-dir", str(internal_tls_dir)]  # the CLI calls the registry itself, over mTLS
            assert run([*tls_dir, "--target", registry.target, "push", model, str(second)]) == 1
            err = capsys.readouterr().err
            assert err.startswith("error: UNAVAILABLE: ") and registry.target in err, err
            assert "hint: the service is down" in err and "--target" in err and "Traceback" not in err

            # A registry on the same Redis keys and blob dir (on another port, found through Consul): pushes work.
            again = launch.registry(
                consul.http_url,
                redis_server.url,
                data_dir,
                REDIS_KEY_PREFIX=registry.env["MODELGRID_REGISTRY_REDIS_KEY_PREFIX"],
            )
            started.append(again)
            assert run([*tls_dir, "--target", again.target, "push", model, str(second)]) == 0
            assert f"pushed {model}:2" in capsys.readouterr().out

            # The predictor's follower reconnects by itself and serves the new version.
            deadline = time.monotonic() + 90
            while (version := predict()[0]) != 2:
                assert version == 1
                assert time.monotonic() < deadline, "the predictor never picked up the version pushed after the restart"
                time.sleep(0.2)
            np.testing.assert_allclose(predict()[1], tf_reference(second)(X), rtol=1e-6)
            assert health(predictor_channel) == health_pb2.HealthCheckResponse.SERVING
        finally:
            for thing in reversed(started):
                if isinstance(thing, grpc.Channel):
                    thing.close()
                else:
                    thing.stop()
