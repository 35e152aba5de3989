"""The training loop of one worker: MultiWorkerMirroredStrategy + tf-keras fit, backups, preemption, export.

Progress goes as JSON lines (services.trainer.progress: shard, started, step, epoch, preempted, exported,
finished) to the file named by MODELGRID_PROGRESS_FILE.

Layout of a worker's checkpoint_dir (its own, on its host: nothing is shared between the workers of a group):
`backup/` (BackupAndRestore: the chief writes `backup/chief`, every other worker writes its own
`backup/workertemp_<i>` and removes it; every worker restores from `backup/chief`, which its agent unpacked from the
checkpoint the group resumes from; the chief removes it after exporting), `snapshots/step-<n>` (the chief's copies
of the backups it announces for its agent to upload to the registry), `shards/task-<i>.json`, `attempts/task-<i>`.
"""

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras as keras

from services.clients.agent.worker_spec import WorkerSpec
from services.trainer.exit_codes import ExitCode
from services.trainer.progress import (
    CheckpointSaved,
    Epoch,
    Exported,
    Finished,
    Preempted,
    ProgressEvent,
    Shard,
    Started,
    Step,
)
from services.trainer.worker import InvalidJob
from services.trainer.worker.contract import CLASSIFICATION, SERVING_OUTPUT, Recipe
from services.trainer.worker.data import TrainingData, make_training_data
from services.trainer.worker.recipes import build_model, load

logger = logging.getLogger(__name__)

PROGRESS_FILE_ENV = "MODELGRID_PROGRESS_FILE"


class ProgressLog:
    """Appends one JSON object per line to the progress file (if configured), flushing each line."""

    def __init__(self, path: str | None, task: int) -> None:
        self.task = task
        self._file = open(path, "a", buffering=1) if path else None  # kept open for the life of the process

    def emit(self, event: ProgressEvent) -> None:
        line = event.to_json()
        logger.info("progress %s", line)
        if self._file:
            self._file.write(line + "\n")
            self._file.flush()


def cluster_shape() -> tuple[int, int]:
    """(task index, number of workers) from TF_CONFIG; (0, 1) without it."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    workers = config.get("cluster", {}).get("worker", [])
    task = config.get("task", {})
    if workers and task.get("type", "worker") != "worker":
        raise InvalidJob("TF_CONFIG: only a 'worker' job is supported (worker 0 is the chief)")
    return int(task.get("index", 0)), max(len(workers), 1)


def make_strategy() -> tf.distribute.MultiWorkerMirroredStrategy:
    """MWMS with RING collectives (CPU). Must run before any other TensorFlow op."""
    tf.config.threading.set_intra_op_parallelism_threads(int(os.environ.get("TF_NUM_INTRAOP_THREADS", "1")))
    tf.config.threading.set_inter_op_parallelism_threads(int(os.environ.get("TF_NUM_INTEROP_THREADS", "2")))
    ring = tf.distribute.experimental.CommunicationImplementation.RING
    options = tf.distribute.experimental.CommunicationOptions(implementation=ring)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


class PreemptibleBackup(keras.callbacks.BackupAndRestore):
    """BackupAndRestore that also saves at a step the whole group agrees on when any worker gets SIGTERM.

    tf-keras only wires PreemptionCheckpointHandler into BackupAndRestore on GCP, so this does it with the public
    TerminationConfig: the handler coordinates the step through the coordination service, then calls save_fn
    (a regular backup at that step) and exit_fn on every worker.
    """

    def __init__(self, backup_dir: str, save_freq: int, on_preempted, on_saved=None) -> None:
        super().__init__(backup_dir, save_freq=save_freq, delete_checkpoint=False)
        self._on_preempted = on_preempted
        self._on_saved = on_saved  # on_saved(preempting): after each backup (the chief's snapshots)
        self._preempting = False
        self._handler = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        unused = tf.train.CheckpointManager(tf.train.Checkpoint(), os.path.join(self.backup_dir, "unused"), 1)
        config = tf.distribute.experimental.TerminationConfig(exit_fn=self._on_preempted, save_fn=self._save_now)
        self._handler = tf.distribute.experimental.PreemptionCheckpointHandler(
            self.model.distribute_strategy.cluster_resolver, unused, termination_config=config
        )

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        self._handler.save_checkpoint_if_preempted()

    def _save_now(self):
        self._preempting = True
        self._backup(epoch=self._current_epoch)

    def _backup(self, epoch, batch=0):
        super()._backup(epoch, batch)
        if self._on_saved is not None:
            self._on_saved(self._preempting)


class ProgressReporter(keras.callbacks.Callback):
    """Emits started/step/epoch events; placed after the backup callback so it sees the restored step."""

    def __init__(self, progress: ProgressLog, spec: WorkerSpec, workers: int, attempt: int, steps: int) -> None:
        super().__init__()
        self.progress, self.spec, self.workers, self.attempt, self.steps = progress, spec, workers, attempt, steps
        self.initial_step = 0
        self.epoch = 1
        self.last_epoch_logs: dict[str, float] = {}

    def global_step(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def on_train_begin(self, logs=None):
        self.initial_step = self.global_step()
        self.progress.emit(
            Started(
                task=self.progress.task,
                workers=self.workers,
                attempt=self.attempt,
                initial_step=self.initial_step,
                steps_per_epoch=self.steps,
                epochs=self.spec.epochs,
            )
        )

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        step = self.global_step()
        if step % self.spec.report_every_steps == 0:
            # Batch logs are each worker's running means summed over replicas (distribute_reduction_method "sum");
            # epoch logs come from the synchronized metrics.
            replicas = self.model.distribute_strategy.num_replicas_in_sync
            values = {k: v / replicas for k, v in _floats(logs).items() if not k.startswith("val_")}
            self.progress.emit(Step(step=step, epoch=self.epoch, metrics=values))

    def on_epoch_end(self, epoch, logs=None):
        self.last_epoch_logs = _floats(logs)
        self.progress.emit(Epoch(epoch=epoch + 1, metrics=dict(self.last_epoch_logs)))


class TestingAids(keras.callbacks.Callback):
    """step_delay_ms (sleep after each step) and crash_at_step (exit 3 on the chosen task)."""

    def __init__(self, spec: WorkerSpec, task: int, attempt: int) -> None:
        super().__init__()
        self.delay = spec.step_delay_ms / 1000.0
        armed = spec.crash_at_step is not None and task == spec.crash_task and (spec.always_crash or attempt == 1)
        self.crash_at = spec.crash_at_step if armed else None

    def on_train_batch_end(self, batch, logs=None):
        if self.delay:
            time.sleep(self.delay)
        if self.crash_at is not None and int(self.model.optimizer.iterations.numpy()) >= self.crash_at:
            logger.error("crash_at_step %d reached: exiting with code %d", self.crash_at, ExitCode.INJECTED_CRASH)
            logging.shutdown()
            os._exit(ExitCode.INJECTED_CRASH)


MAX_REPORTED_METRICS = 64
"""Most metrics one progress event carries (the loss and every compiled metric, per output, with val_ twins)."""


def _floats(logs: dict | None) -> dict[str, float]:
    """The numeric entries of keras logs (the loss and each metric), at most MAX_REPORTED_METRICS of them."""
    values = {}
    for name, value in (logs or {}).items():
        try:
            values[str(name)] = float(value)
        except (TypeError, ValueError):
            continue
        if len(values) == MAX_REPORTED_METRICS:
            break
    return values


def compile_args(recipe: Recipe) -> dict:
    """loss and metrics for model.compile: the recipe's hooks, or its task's defaults (call under the strategy's
    scope: metric objects belong to it)."""
    if recipe.task == CLASSIFICATION:
        loss = keras.losses.SparseCategoricalCrossentropy()
        metrics = ["accuracy"]
    else:
        loss = keras.losses.MeanSquaredError()
        metrics = [keras.metrics.MeanSquaredError(name="mse"), keras.metrics.MeanAbsoluteError(name="mae")]
    if recipe.loss is not None:
        loss = recipe.loss()
    if recipe.metrics is not None:
        metrics = recipe.metrics()
    return {"loss": loss, "metrics": metrics}


def next_attempt(checkpoint_dir: Path, task: int) -> int:
    """Counts this task's starts for the job (1 on the first)."""
    path = checkpoint_dir / "attempts" / f"task-{task}"
    path.parent.mkdir(parents=True, exist_ok=True)
    attempt = int(path.read_text() or 0) + 1 if path.exists() else 1
    path.write_text(str(attempt))
    return attempt


def record_shard(
    strategy, spec: WorkerSpec, task: int, workers: int, progress: ProgressLog, recipe: Recipe | None = None
) -> None:
    """Reads epoch 1 of the training set exactly as fit distributes it, with ids, and records this worker's ids."""
    data = make_training_data(
        spec.dataset,
        per_replica_batch=spec.batch_size,
        num_replicas=strategy.num_replicas_in_sync,
        num_workers=workers,
        validation_split=spec.validation_split,
        seed=spec.seed,
        with_ids=True,
        repeat=False,
        recipe=recipe,
    )
    ids: list[np.ndarray] = []
    for _, _, example_ids in strategy.experimental_distribute_dataset(data.train):
        ids.extend(t.numpy() for t in strategy.experimental_local_results(example_ids))
    seen = np.sort(np.concatenate(ids)) if ids else np.zeros(0, np.int64)
    digest = hashlib.sha256(seen.astype("<i8").tobytes()).hexdigest()
    out = Path(spec.checkpoint_dir) / "shards" / f"task-{task}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"task": task, "workers": workers, "policy": data.shard_policy.name, "ids": seen.tolist()}
    out.write_text(json.dumps(record))
    progress.emit(
        Shard(task=task, num_examples=int(len(seen)), example_ids_digest=digest, policy=data.shard_policy.name)
    )


class Snapshots:
    """The chief's copies of its backups for its agent to upload: every `every`-th backup and the preemption's are
    hard-linked (copied across file systems) from `backup/chief` into `snapshots/step-<step>`, then announced with a
    `checkpoint` progress event. The agent removes each once it is uploaded."""

    def __init__(self, checkpoint_dir: Path, every: int, progress: ProgressLog, step) -> None:
        self._source = checkpoint_dir / "backup" / "chief"
        self._target = checkpoint_dir / "snapshots"
        self._every = every
        self._progress = progress
        self._step = step  # () -> the global step
        self._saves = 0
        self._last = -1

    def on_saved(self, preempting: bool) -> None:
        self._saves += 1
        if preempting or self._saves % self._every == 0:  # the preemption's: the step the group resumes from
            self.take()

    def take(self) -> None:
        step = self._step()
        if step == self._last:
            return  # announced already (a preemption right at a regular backup)
        if not self._source.is_dir():
            logger.warning("no backup at %s to snapshot at step %d", self._source, step)
            return
        self._last = step
        target = self._target / f"step-{step}"
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(self._source, partial, copy_function=_link_or_copy)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        self._progress.emit(CheckpointSaved(step=step, path=str(target)))


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)  # the backup's files are replaced, never rewritten in place: a link is a copy
    except OSError:
        shutil.copy2(source, target)


def export(
    model: keras.Model,
    input_shape: tuple[int, ...],
    export_dir: str,
    scratch: Path,
    chief: bool,
    task: str = CLASSIFICATION,
) -> str:
    """SavedModel with signature serving_default(x) -> {"probabilities"} (a classifier), {"predictions"} (a
    regression model), or one output per name of a multi-output model; every worker saves, the chief's counts."""
    module = tf.Module()
    module.model = model
    names = list(model.output_names)

    @tf.function(input_signature=[tf.TensorSpec([None, *input_shape], tf.float32, name="x")])
    def serve(x):
        outputs = model(x, training=False)
        if isinstance(outputs, dict):
            return dict(outputs)
        if isinstance(outputs, list | tuple):
            return dict(zip(names, outputs, strict=True))
        return {SERVING_OUTPUT[task]: outputs}

    module.serve = serve
    target = Path(export_dir) if chief else scratch
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tf.saved_model.save(module, str(partial), signatures={"serving_default": serve})
    if not chief:
        shutil.rmtree(partial, ignore_errors=True)
        return ""
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return str(target)


def run(spec: WorkerSpec) -> int:
    """Trains, exports on the chief, returns the exit code (preemption and injected crashes exit directly)."""
    task, workers = cluster_shape()
    logging.getLogger("absl").setLevel(logging.WARNING)  # a line per checkpoint shard otherwise
    # Joining the group blocks in C++ (holding the GIL, with TensorFlow's own SIGTERM handler installed) until
    # every peer is up, for up to an hour: the kernel's default SIGALRM action bounds that wait.
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(math.ceil(spec.startup_timeout_s))
    logger.info("task %d of %d: joining the group (up to %ss)", task, workers, spec.startup_timeout_s)
    strategy = make_strategy()
    signal.alarm(0)
    chief = task == 0
    checkpoint_dir = Path(spec.checkpoint_dir)
    progress = ProgressLog(os.environ.get(PROGRESS_FILE_ENV), task)
    attempt = spec.attempt or next_attempt(checkpoint_dir, task)

    def preempted(step: int | None = None) -> None:
        progress.emit(Preempted(task=task, step=step))
        logging.shutdown()
        os._exit(ExitCode.PREEMPTED)

    # Until fit() starts (and again after it), the last backup is the state to resume from: just stop.
    signal.signal(signal.SIGTERM, lambda *_: preempted())
    keras.utils.set_random_seed(spec.seed)
    try:
        recipe = load(spec.recipe, spec.recipes_dir)
        if spec.record_shard_ids:
            record_shard(strategy, spec, task, workers, progress, recipe)
        data: TrainingData = make_training_data(
            spec.dataset,
            per_replica_batch=spec.batch_size,
            num_replicas=strategy.num_replicas_in_sync,
            num_workers=workers,
            validation_split=spec.validation_split,
            seed=spec.seed,
            recipe=recipe,
        )
        with strategy.scope():
            model = build_model(recipe, data.input_shape, data.num_outputs, spec.recipe_params)
            optimizer_cls = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}[spec.optimizer]
            try:
                compiled = compile_args(recipe)
            except Exception as exc:  # the user's hooks: any failure is a property of the recipe
                raise ValueError(f"recipe {recipe.name}: its loss or metrics hook failed: {exc!r}") from exc
            try:
                model.compile(optimizer=optimizer_cls(learning_rate=spec.learning_rate), **compiled)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"recipe {recipe.name}: compile failed with its loss and metrics: {exc}") from exc
            model.distribute_reduction_method = "sum"
    except (ValueError, tf.errors.InvalidArgumentError) as exc:  # bad recipe, unreadable or malformed data
        raise InvalidJob(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
    snapshots = None
    if chief and spec.snapshot_checkpoint_every:
        global_step = lambda: int(model.optimizer.iterations.numpy())  # noqa: E731
        snapshots = Snapshots(checkpoint_dir, spec.snapshot_checkpoint_every, progress, global_step)
    backup = PreemptibleBackup(
        str(checkpoint_dir / "backup"),
        spec.checkpoint_every_steps,
        on_preempted=lambda: preempted(int(model.optimizer.iterations.numpy())),
        on_saved=snapshots.on_saved if snapshots else None,
    )
    reporter = ProgressReporter(progress, spec, workers, attempt, data.steps_per_epoch)
    model.fit(
        data.train,
        epochs=spec.epochs,
        steps_per_epoch=data.steps_per_epoch,
        validation_data=data.validation,
        callbacks=[backup, reporter, TestingAids(spec, task, attempt)],
        verbose=0,
    )
    signal.signal(signal.SIGTERM, lambda *_: preempted())  # training is over; resume from the last backup
    step = int(model.optimizer.iterations.numpy())
    metrics = {**reporter.last_epoch_logs, "steps": step}
    if data.validation is not None and not reporter.last_epoch_logs:
        # Resumed after the last epoch had ended: nothing was trained now, so measure the restored model.
        results = model.evaluate(data.validation, verbose=0, return_dict=True)
        metrics.update({f"val_{k}": float(v) for k, v in results.items()})
    if spec.export_dir:
        scratch = checkpoint_dir / f"export-task-{task}"
        path = export(model, data.input_shape, spec.export_dir, scratch, chief, recipe.task)
        if chief:
            progress.emit(Exported(path=path, metrics=metrics))
    if chief:
        shutil.rmtree(checkpoint_dir / "backup" / "chief", ignore_errors=True)
    progress.emit(Finished(task=task, step=step))
    sys.stdout.flush()
    return ExitCode.OK
