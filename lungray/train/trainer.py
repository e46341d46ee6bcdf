"""Training a model on an ingested dataset with Ray Train, resumably, into a model directory.

`run_training` builds a `TorchTrainer` whose workers run `lungray.train.loop` on shards of
the ingest's train and val splits, then exports the best epoch as a model directory.

Ray keeps its run under `OUTPUT/_ray/` with a fixed name, so running the same command
again continues from the last checkpoint instead of starting over (Ray Train resumes a
run it finds at the same storage path and name), and a run that was already trained and
exported with the same settings is left as it is.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray
from pyarrow.fs import FileSelector, FileSystem, FileType
from ray.actor import ActorHandle
from ray.data import DataIterator, Dataset, ExecutionOptions
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    LoggingConfig,
    Result,
    RunConfig,
    ScalingConfig,
    UserCallback,
)
from ray.train.torch import TorchTrainer
from sklearn.utils.class_weight import compute_class_weight

from lungray.evaluate import labelled_split
from lungray.ingest import ingest_rows, load_summary
from lungray.io.listing import exists, filesystem_for, is_s3, join_uri, read_bytes
from lungray.modeldir import META_FILE
from lungray.models import ARCHITECTURES, ModelConfig, default_config
from lungray.preprocess import DTYPES, PreprocessConfig
from lungray.raysession import cluster_cpus
from lungray.train.augment import ADDED_SINCE_FIRST_RELEASE, AugmentConfig
from lungray.train.export import export_model_dir
from lungray.train.loop import PROGRESS_FILE, SCHEDULES, SELECTIONS, LoopConfig, Progress, train_loop_per_worker

log = logging.getLogger(__name__)

RAY_DIR = "_ray"
RUN_NAME = "train"
FAULT_MARKER = "fault-injected"
# TrainConfig fields that say where data and output live and how the run is executed; the
# others decide the model and are its hyperparameters.
RUN_SETTINGS = ("data", "output", "size", "max_failures", "cpus_per_worker", "fail_at_epoch")
# Hyperparameters that a rerun may change and still continue the stored run.
RESUMABLE_CHANGES = ("epochs", "patience", "min_sensitivity", "select")  # the last two only decide the export
# Ray keeps this many checkpoints by val AUROC and never deletes the latest, so the best
# and the latest stay; each checkpoint also carries the best weights, so the latest suffices.
CHECKPOINTS_TO_KEEP = 1
# CPUs left to Ray Data: with every CPU held by a training worker, the Parquet reads
# that feed them cannot be scheduled and the run hangs.
CPUS_FOR_DATA = 1.0
MIN_CPUS_PER_WORKER = 0.25
# Ray's advice for training ingest: splits that fit in the object store are read once and
# kept there, instead of being read again by a new streaming executor every epoch. On 2 CPUs
# the re-read cost about 5 s an epoch against 0.4 s of training (bundled sample at 64 px).
# A quarter of the store (shared among the concurrent trials of a sweep, each holding its own
# copy) leaves room for the blocks in flight.
CACHE_FRACTION_OF_OBJECT_STORE = 0.25


@dataclass(frozen=True)
class TrainConfig:
    """One training run: model, data, output, and the hyperparameters recorded in model.json."""

    model: str
    data: str
    output: str
    workers: int = 2
    use_gpu: bool = False
    epochs: int = 15
    batch_size: int = 32  # per worker
    lr: float = 1e-3
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    seed: int = 0
    patience: int = 4
    min_sensitivity: float = 0.95
    label_smoothing: float = 0.1  # of the training loss; validation loss is plain cross-entropy
    ema_decay: float = 0.995  # weights validated and exported are this exponential moving average (0: off)
    mixup_alpha: float = 0.0  # MixUp of training batches, lambda ~ Beta(alpha, alpha) (0: off)
    schedule: str = "cosine"  # learning rate: "cosine" (to 1% over `epochs`) or "plateau" (halved when val loss stalls)
    select: str = "last"  # the exported weights: the "last" epoch's or those of the "best" val AUROC (SELECTIONS)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields other than arch, e.g. dropout
    size: int | None = None  # if set, the image size the data must have
    max_failures: int = 2
    cpus_per_worker: float | None = None  # default: the cluster's CPUs less one for Ray Data, shared
    fail_at_epoch: int | None = None  # test hook, see LoopConfig

    def __post_init__(self) -> None:
        if self.model not in ARCHITECTURES:
            raise ValueError(f"model must be one of {ARCHITECTURES}, got {self.model!r}")
        for name in ("workers", "epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {self.weight_decay}")
        if "arch" in self.model_overrides:
            raise ValueError("model_overrides must not set arch: the model field does")
        self.model_config()  # unknown or invalid overrides fail here, not on the workers
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.mixup_alpha < 0:
            raise ValueError(f"mixup_alpha must be non-negative, got {self.mixup_alpha}")
        if self.select not in SELECTIONS:
            raise ValueError(f"select must be one of {SELECTIONS}, got {self.select!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 < self.min_sensitivity <= 1.0:
            raise ValueError(f"min_sensitivity must lie in (0, 1], got {self.min_sensitivity}")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be positive, got {self.cpus_per_worker}")

    def hyperparameters(self) -> dict[str, Any]:
        """What decides the trained model (JSON-ready); saved as model.json's `training`."""
        values = asdict(self)
        for name in RUN_SETTINGS:
            del values[name]
        return values

    def model_config(self) -> ModelConfig:
        """The architecture to train: the model's defaults with `model_overrides` applied."""
        return ModelConfig.from_dict({**default_config(self.model).to_dict(), **self.model_overrides})


class WholeValidationSplit(DataConfig):
    """Train shards of equal size, val shards of any size.

    Every DDP rank must take the same number of steps, so the train split is cut into equal
    shards (dropping a few rows if needed); validation must see every image, so its shards
    may differ in size.
    """

    def configure(
        self,
        datasets: dict[str, Dataset],
        world_size: int,
        worker_handles: list[ActorHandle] | None,
        worker_node_ids: list[str] | None,
        **kwargs: Any,
    ) -> list[dict[str, DataIterator]]:
        """Ray Train calls this once per dataset; "val" is split here, the others by DataConfig."""
        others = {name: dataset for name, dataset in datasets.items() if name != "val"}
        shards = super().configure(others, world_size, worker_handles, worker_node_ids, **kwargs)
        if "val" in datasets:
            val_shards = datasets["val"].streaming_split(world_size, equal=False, locality_hints=worker_node_ids)
            for shard, val_shard in zip(shards, val_shards):
                shard["val"] = val_shard
        return shards


def labels_by_split(data: str) -> dict[str, np.ndarray]:
    """The known labels of each split, read from the two small columns only."""
    table = ingest_rows(data, ["split", "label"], pads.field("label").is_valid())
    return {
        name: table.filter(pc.equal(table["split"], name))["label"].to_numpy().astype(np.int64)
        for name in ("train", "val")
    }


def balanced_class_weights(labels: dict[str, np.ndarray]) -> tuple[float, float]:
    """Cross-entropy weights n / (2 n_class) from the train labels, after checking both splits."""
    for name, values in labels.items():
        counts = np.bincount(values, minlength=2)
        if counts.min() == 0:
            raise ValueError(f"the {name} split needs labelled normal and abnormal images, has {counts.tolist()}")
    weights = compute_class_weight("balanced", classes=np.array([0, 1]), y=labels["train"])
    return float(weights[0]), float(weights[1])


def latest_progress(run_uri: str) -> Progress | None:
    """Progress of the newest checkpoint of a previous run at `run_uri` (local or s3://), if any."""
    filesystem, path = filesystem_for(run_uri)
    if filesystem.get_file_info(path).type != FileType.Directory:
        return None
    files = [info.path for info in filesystem.get_file_info(FileSelector(path, recursive=True)) if info.base_name == PROGRESS_FILE]
    progresses = [stored_progress(filesystem, file) for file in files]
    return max(progresses, key=lambda progress: progress.next_epoch, default=None)


def stored_progress(filesystem: FileSystem, file: str) -> Progress:
    with filesystem.open_input_stream(file) as stream:
        return Progress(**json.loads(stream.read()))


# Settings added since the first release, at the values the runs before them used.
TRAINING_ADDED_SINCE_FIRST_RELEASE = {
    "weight_decay": 0.0, "label_smoothing": 0.0, "ema_decay": 0.0, "mixup_alpha": 0.0, "schedule": "plateau", "select": "best",
}


def with_defaults(stored: dict[str, Any]) -> dict[str, Any]:
    """Stored hyperparameters completed with the settings added since they were written, at the
    values that run used (off), so that a run from an older lungray is read as what it was:
    it still resumes with its own settings and does not pass for a run of today's defaults."""
    defaults = TrainConfig(model=stored["model"], data="", output="").hyperparameters()
    augment = {**defaults["augment"], **ADDED_SINCE_FIRST_RELEASE, **stored.get("augment", {})}
    return {**defaults, **TRAINING_ADDED_SINCE_FIRST_RELEASE, **stored, "augment": augment}


def check_resumable(previous: Progress, config: TrainConfig, fingerprint: str) -> None:
    """Refuse to continue a stored run with other data or other settings than `RESUMABLE_CHANGES`."""
    if previous.data_fingerprint != fingerprint:
        raise ValueError(f"{config.output} holds a run trained on other data; choose a new --output")
    fixed = {key: value for key, value in config.hyperparameters().items() if key not in RESUMABLE_CHANGES}
    stored = {key: value for key, value in with_defaults(previous.hyperparameters).items() if key not in RESUMABLE_CHANGES}
    changed = sorted(key for key in fixed.keys() | stored.keys() if fixed.get(key) != stored.get(key))
    if changed:
        raise ValueError(f"{config.output} holds a run with other {changed}; rerun with its settings or choose a new --output")


def is_exported(output: str, config: TrainConfig, fingerprint: str) -> bool:
    """Whether `output` (local or s3://) already holds this run's model directory."""
    meta_uri = join_uri(output, META_FILE)
    if not exists(meta_uri):
        return False
    meta = json.loads(read_bytes(meta_uri))
    if "training" not in meta or "lineage" in meta:  # an ensemble's, or derived for a site: never overwritten
        raise FileExistsError(f"{output} holds a model directory not written by `lungray train`; choose another --output")
    return with_defaults(meta["training"]) == config.hyperparameters() and meta["data_fingerprint"] == fingerprint


def worker_cpus(config: TrainConfig) -> float:
    if config.cpus_per_worker is not None:
        return config.cpus_per_worker
    return max(MIN_CPUS_PER_WORKER, (cluster_cpus() - CPUS_FOR_DATA) / config.workers)


def loop_config(
    config: TrainConfig, fingerprint: str, cpus_per_worker: float, fail_marker: str | None = None, console_log_level: str | None = None
) -> LoopConfig:
    """What the workers of `config`'s run need, with class weights from the data's train labels.

    `console_log_level` None: Ray Train's lines at the level this process logs Ray Train at."""
    return LoopConfig(
        model=config.model_config(),
        augment=config.augment,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=config.weight_decay,
        label_smoothing=config.label_smoothing,
        ema_decay=config.ema_decay,
        mixup_alpha=config.mixup_alpha,
        schedule=config.schedule,
        seed=config.seed,
        patience=config.patience,
        use_gpu=config.use_gpu,
        threads=max(1, math.floor(cpus_per_worker)),
        class_weights=balanced_class_weights(labels_by_split(config.data)),
        hyperparameters=config.hyperparameters(),
        data_fingerprint=fingerprint,
        fail_at_epoch=config.fail_at_epoch,
        fail_marker=fail_marker,
        console_log_level=console_log_level or ray_train_console_level(),
    )


def ray_train_console_level() -> str:
    """The level of Ray Train's own console lines (worker group, checkpoints, reports): the
    level this driver logs Ray Train at, so warnings only under `lungray` without --verbose."""
    return logging.getLevelName(logging.getLogger("ray.train").getEffectiveLevel())


def splits_bytes(summary: dict[str, Any], splits: Sequence[str]) -> int:
    """Bytes the stored image tensors of `splits` take (labels are negligible beside them)."""
    preprocess = PreprocessConfig.from_dict(summary["preprocess"])
    per_image = preprocess.size**2 * np.dtype(DTYPES[preprocess.dtype]).itemsize
    return per_image * sum(int(summary["splits"][split]["images"]) for split in splits)


def training_datasets(data: str, object_store_bytes: float, seed: int = 0) -> dict[str, Dataset]:
    """The train and val splits, materialized in the object store when they fit in
    `CACHE_FRACTION_OF_OBJECT_STORE` of it, else streamed from storage each epoch.

    The train rows are shuffled across the whole split first: an ingest stores them by source
    and label (Kermany: 939 normal, then 2,712 abnormal), Ray Train gives each worker a
    contiguous share, and a worker's shuffle buffer mixes only nearby rows, so one of two
    workers trained on abnormal films alone (val AUROC 0.946 against 0.977 after an epoch)."""
    datasets = {"train": labelled_split(data, "train").random_shuffle(seed=seed), "val": labelled_split(data, "val")}
    needed = splits_bytes(load_summary(data), list(datasets))
    if needed > CACHE_FRACTION_OF_OBJECT_STORE * object_store_bytes:
        log.info("streaming %s each epoch: %d MB does not fit a quarter of the object store", data, needed >> 20)
        return datasets
    return {split: dataset.materialize() for split, dataset in datasets.items()}


def build_trainer(
    config: TrainConfig,
    loop: LoopConfig,
    cpus_per_worker: float,
    storage: str,
    name: str = RUN_NAME,
    callbacks: Sequence[UserCallback] = (),
    store_share: float = 1.0,
) -> TorchTrainer:
    """The run `name` under `storage` (a local folder or s3:// prefix); rebuilding it with the
    same storage and name continues the stored run. `store_share`: the part of the object
    store this run may cache its data in (1 / the trials a sweep runs at once)."""
    filesystem, storage_path = filesystem_for(storage)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": loop},
        scaling_config=ScalingConfig(
            num_workers=config.workers, use_gpu=config.use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            callbacks=list(callbacks),
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=CHECKPOINTS_TO_KEEP, checkpoint_score_attribute="val_auroc", checkpoint_score_order="max"
            ),
            logging_config=LoggingConfig(log_level=loop.console_log_level),
        ),
        datasets=training_datasets(config.data, store_share * ray.cluster_resources().get("object_store_memory", 0.0), config.seed),
        # Ray Data's default options, given here: Ray Train's own default copies the deprecated
        # `exclude_resources` into them and so prints a RayDeprecationWarning on every run.
        dataset_config=WholeValidationSplit(execution_options=ExecutionOptions()),
    )


def run_training(config: TrainConfig) -> str:
    """Train (or resume) on the current Ray cluster and export the model directory; returns its path.

    The output may be s3://: checkpoints go there through Ray Train's storage (which every
    node of a cluster reaches, unlike a head's local disk), and so does the model directory.
    """
    summary = load_summary(config.data)
    preprocess = PreprocessConfig.from_dict(summary["preprocess"])
    if config.size is not None and config.size != preprocess.size:
        raise ValueError(f"{config.data} holds {preprocess.size} px images, not the --size {config.size} asked for")
    output = config.output if is_s3(config.output) else str(Path(config.output).resolve())
    fingerprint = summary["fingerprint"]
    if is_exported(output, config, fingerprint):
        log.warning("%s already holds this model, trained with these settings on this data; nothing to do", config.output)
        return config.output
    storage = join_uri(output, RAY_DIR)
    previous = latest_progress(join_uri(storage, RUN_NAME))
    checkpoint = None
    if previous is not None:
        check_resumable(previous, config, fingerprint)
        checkpoint = finished_checkpoint(join_uri(storage, RUN_NAME), config)
        if checkpoint is not None:
            log.warning("the run in %s has finished; exporting its last checkpoint again", config.output)
        else:
            log.warning("resuming the run in %s after epoch %d", config.output, previous.next_epoch - 1)

    if checkpoint is None:
        cpus_per_worker = worker_cpus(config)
        # The fault-injection marker (tests) is a local file that the workers create.
        fail_marker = None if is_s3(output) else join_uri(storage, FAULT_MARKER)
        loop = loop_config(config, fingerprint, cpus_per_worker, fail_marker=fail_marker)
        checkpoint = build_trainer(config, loop, cpus_per_worker, storage).fit().checkpoint
    if checkpoint is None:
        raise RuntimeError(f"training in {config.output} finished without a checkpoint")
    export_model_dir(checkpoint, output, summary["preprocess"], config.min_sensitivity, config.select, decode=summary.get("decode"))
    return config.output


def finished_checkpoint(run_uri: str, config: TrainConfig) -> Checkpoint | None:
    """The stored run's latest checkpoint when it leaves nothing to train for `config` (a
    re-export with another --select or --min-sensitivity), else None.

    It is the checkpoint a resumed `fit()` would restore and, with no epoch left, return:
    exporting it directly spares starting the workers to do nothing (docs/results.md: start-up costs).
    """
    filesystem, path = filesystem_for(run_uri)
    try:
        checkpoint = Result.from_path(path, storage_filesystem=filesystem).checkpoint
    except RuntimeError:  # no checkpoint registered yet (killed before the first report): train
        return None
    if checkpoint is None:
        return None
    progress = stored_progress(checkpoint.filesystem, f"{checkpoint.path}/{PROGRESS_FILE}")
    return checkpoint if progress.finished(config.epochs, config.patience) else None
