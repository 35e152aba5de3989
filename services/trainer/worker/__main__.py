"""Entry point of a training worker: `python -m services.trainer.worker --spec spec.json`.

TF_CONFIG (set by the agent) names the group and this task. The environment is completed here, before
TensorFlow is imported: tf-keras instead of Keras 3 (whose fit fails under MultiWorkerMirroredStrategy), one
compute thread per worker (several workers share a small machine), oneDNN off (see ENV_DEFAULTS).
"""

import argparse
import logging
import os
import sys
from pathlib import Path

from services.clients.agent.worker_spec import WorkerSpec
from services.trainer.exit_codes import ExitCode
from services.trainer.worker import InvalidJob

logger = logging.getLogger("services.trainer.worker")

ENV_DEFAULTS = {
    "OMP_NUM_THREADS": "1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "2",
    # TF 2.21's oneDNN Conv2D returns the wrong shape for an empty batch ((0,8,8,1) for 16 filters), and MWMS
    # hands empty batches to a worker whose shard has run out (uneven FILE shards, evaluation tails).
    "TF_ENABLE_ONEDNN_OPTS": "0",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.trainer.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, type=Path, help="JSON job spec (see WorkerSpec)")
    parser.add_argument("--log-format", choices=("text", "json"), default=os.environ.get("MODELGRID_LOG_FORMAT"))
    args = parser.parse_args(argv)

    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name, value in ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)

    from services.kit.logs import configure_logging

    configure_logging(os.environ.get("MODELGRID_LOG_LEVEL", "INFO"), args.log_format or "text")
    try:
        spec = WorkerSpec.from_json(args.spec.read_text())
    except (OSError, ValueError) as exc:
        logger.error("invalid spec %s: %s", args.spec, exc)
        return ExitCode.INVALID_SPEC

    from services.trainer.worker import train

    try:
        return train.run(spec)
    except InvalidJob as exc:
        logger.error("invalid job: %s", exc, exc_info=exc.__cause__ is not None)
        return ExitCode.INVALID_SPEC
    except Exception:
        logger.exception("training failed")
        return ExitCode.FAILED


if __name__ == "__main__":
    sys.exit(main())
