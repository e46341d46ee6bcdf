"""Hyperparameter sweeps with Ray Tune, where every trial is a `lungray train` run.

A search-space file (YAML; the format is in tune_spaces/README.md) names the model, the
epochs per trial and a distribution per hyperparameter. It is checked on load, so a typo
fails before any trial starts, with a message that names the key at fault.

Each trial turns its sampled values into a `TrainConfig` and runs the training system's
own `TorchTrainer` (`lungray.train.trainer.build_trainer`). Under Ray Train V2, Tune cannot
take a trainer directly: the trial is a function that builds one and calls `fit()`, and
`TuneReportCallback` forwards each epoch's report (val_auroc, val_loss, checkpoint path)
to Tune, where ASHA stops the trials that trail the others at each rung.

Layout of the output folder:
- `sweep.json`: the sweep's settings; a rerun with other settings is refused.
- `_ray/` (or `--storage`, which may be s3://): `sweep/` is Tune's experiment and
  `trials/<trial_id>/` each trial's Train run with its checkpoints.
- `results.parquet`, `results.csv`: one row per trial, best first.
- `best/`: the best trial as a model directory, exported as `lungray train` exports.
- `tune.png`: validation AUROC against each searched hyperparameter.

Running the same command again after an interruption restores the experiment: finished
trials are kept, and unfinished ones continue from their last epoch's checkpoint, since
their Train run is rebuilt at the same storage and name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any
from unittest import mock

import numpy as np
import pandas as pd
import ray
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter
from pyarrow.fs import FileSystem
from ray import tune
from ray.train import Checkpoint
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator
from ray.util.state import list_nodes
from ray.util.state.exception import RayStateApiException

from lungray.configs import is_number
from lungray.ingest import load_summary
from lungray.io.listing import absolute_uri, filesystem_for, join_uri
from lungray.models import ARCHITECTURES
from lungray.report.plots import PANEL_INCHES, png_bytes
from lungray.train.export import export_model_dir
from lungray.train.trainer import (
    CPUS_FOR_DATA,
    MIN_CPUS_PER_WORKER,
    RAY_DIR,
    TrainConfig,
    build_trainer,
    loop_config,
    ray_train_console_level,
    stored_progress,
)
from lungray.train.loop import PROGRESS_FILE

log = logging.getLogger(__name__)

SETTINGS_FILE = "sweep.json"
SWEEP_NAME = "sweep"
CONSOLE_LOG = "tune-console.log"  # Tune's own console tables, without --verbose
TRIALS_DIR = "trials"
TUNE_SIGINT_SWITCH = "TUNE_DISABLE_SIGINT_HANDLER"  # read by tune.run when it starts
BEST_DIR = "best"
# The trial function only waits on its TorchTrainer, whose workers hold the real CPUs.
TRIAL_CPUS = 0.1
# Each rung keeps the better half: with sweeps of a few epochs, ASHA's default of a quarter
# would decide almost everything at the first rung.
REDUCTION_FACTOR = 2
METRIC_MODES = {"val_auroc": "max", "val_loss": "min"}
SCHEDULERS = ("asha", "fifo")
DISTRIBUTIONS = ("uniform", "loguniform", "choice", "grid")
RANGE_DISTRIBUTIONS = ("uniform", "loguniform")
SPACE_KEYS = ("model", "epochs", "params")


@dataclass(frozen=True)
class Tunable:
    """A hyperparameter a space may search: its type, and whether it is a ModelConfig field."""

    kind: type
    in_model: bool
    models: tuple[str, ...] = ARCHITECTURES


TUNABLES = {
    "lr": Tunable(float, in_model=False),
    "weight_decay": Tunable(float, in_model=False),
    "batch_size": Tunable(int, in_model=False),
    "dropout": Tunable(float, in_model=True),
    "lstm_hidden": Tunable(int, in_model=True, models=("cnn_lstm",)),
    "lstm_layers": Tunable(int, in_model=True, models=("cnn_lstm",)),
    "bidirectional": Tunable(bool, in_model=True, models=("cnn_lstm",)),
}


class SpaceError(ValueError):
    """A search-space file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class ParamSpec:
    """One searched hyperparameter: a range (uniform, loguniform) or a list of values (choice, grid)."""

    name: str
    dist: str
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()

    def domain(self) -> Any:
        """The Tune search domain; grid runs every value once per sample."""
        if self.dist == "uniform":
            return tune.uniform(self.low, self.high)
        if self.dist == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.dist == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))


@dataclass(frozen=True)
class SearchSpace:
    model: str
    epochs: int
    params: tuple[ParamSpec, ...]

    def param_space(self) -> dict[str, Any]:
        return {param.name: param.domain() for param in self.params}

    def to_dict(self) -> dict[str, Any]:
        """The file's content, normalised (JSON-ready); recorded in sweep.json."""
        params = {}
        for param in self.params:
            spec = {"low": param.low, "high": param.high} if param.dist in RANGE_DISTRIBUTIONS else {"values": list(param.values)}
            params[param.name] = {"dist": param.dist, **spec}
        return {"model": self.model, "epochs": self.epochs, "params": params}


class _SpaceLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as a string; learning rates are written that way. A key
    given twice is refused: PyYAML keeps the last, and the first value would vanish unseen."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_SpaceLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load_space(path: str | Path) -> SearchSpace:
    """Read and check a search-space file."""
    try:
        data = yaml.load(Path(path).read_text(), Loader=_SpaceLoader)
    except yaml.YAMLError as exc:
        raise SpaceError(f"{path}: not valid YAML: {exc}") from exc
    return parse_space(data, str(path))


def parse_space(data: Any, source: str) -> SearchSpace:
    """Check a loaded space file; every problem raises a SpaceError naming `source` and the key."""

    def fail(message: str) -> SpaceError:
        return SpaceError(f"{source}: {message}")

    if not isinstance(data, dict):
        raise fail(f"expected a mapping with keys {list(SPACE_KEYS)}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SPACE_KEYS))
    if unknown:
        raise fail(f"unknown key(s) {unknown}; a space file has {list(SPACE_KEYS)}")
    missing = [key for key in SPACE_KEYS if key not in data]
    if missing:
        raise fail(f"missing key(s) {missing}")
    model = data["model"]
    if model not in ARCHITECTURES:
        raise fail(f"model must be one of {list(ARCHITECTURES)}, got {model!r}")
    epochs = data["epochs"]
    if not _is_kind(epochs, int) or epochs < 1:
        raise fail(f"epochs must be a positive integer, got {epochs!r}")
    if not isinstance(data["params"], dict) or not data["params"]:
        raise fail("params must map at least one hyperparameter to its distribution")
    params = tuple(_parse_param(name, spec, model, fail) for name, spec in data["params"].items())
    return SearchSpace(model=model, epochs=epochs, params=params)


def _is_kind(value: Any, kind: type) -> bool:
    """isinstance, except that a bool is not a number here, and an int is a valid float."""
    if kind is bool:
        return isinstance(value, bool)
    if kind is float:
        return is_number(value)
    return isinstance(value, kind) and not isinstance(value, bool)


def _parse_param(name: str, spec: Any, model: str, fail: Callable[[str], SpaceError]) -> ParamSpec:
    where = f"params.{name}"
    tunable = TUNABLES.get(name)
    if tunable is None:
        raise fail(f"{where}: unknown hyperparameter; tunable are {sorted(TUNABLES)}")
    if model not in tunable.models:
        raise fail(f"{where}: does not apply to model {model} (only to {', '.join(tunable.models)})")
    if not isinstance(spec, dict):
        raise fail(f"{where}: expected a mapping like {{dist: choice, values: [...]}}, got {spec!r}")
    dist = spec.get("dist")
    if dist not in DISTRIBUTIONS:
        raise fail(f"{where}: unknown distribution {dist!r}; use one of {list(DISTRIBUTIONS)}")
    keys = ("dist", "low", "high") if dist in RANGE_DISTRIBUTIONS else ("dist", "values")
    unknown = sorted(set(spec) - set(keys))
    if unknown:
        raise fail(f"{where}: unknown key(s) {unknown} for a {dist} distribution, which takes {list(keys)}")
    missing = [key for key in keys if key not in spec]
    if missing:
        raise fail(f"{where}: missing {missing}")

    def check_value(value: Any, role: str) -> Any:
        if not _is_kind(value, tunable.kind):
            raise fail(f"{where}: {role} must be {tunable.kind.__name__}, got {value!r} ({type(value).__name__})")
        try:  # TrainConfig and ModelConfig own the valid values; they say what is wrong
            trial_config(TrainConfig(model=model, data="", output=""), {name: value})
        except ValueError as exc:
            raise fail(f"{where}: {role} {value!r} is not allowed: {exc}") from None
        return tunable.kind(value)

    if dist in RANGE_DISTRIBUTIONS:
        if tunable.kind is not float:
            raise fail(f"{where}: a {dist} range needs a real-valued hyperparameter; give {name} a choice or grid of values")
        low, high = check_value(spec["low"], "low"), check_value(spec["high"], "high")
        if low == high:
            raise fail(f"{where}: empty range, low == high == {low}; use choice with one value to fix it")
        if low > high:
            raise fail(f"{where}: inverted range, low {low} > high {high}")
        if dist == "loguniform" and low <= 0:
            raise fail(f"{where}: loguniform needs low > 0, got {low}")
        return ParamSpec(name, dist, low=low, high=high)
    values = spec["values"]
    if not isinstance(values, list) or not values:
        raise fail(f"{where}: values must be a non-empty list, got {values!r}")
    return ParamSpec(name, dist, values=tuple(check_value(value, "value") for value in values))


def trial_config(base: TrainConfig, params: Mapping[str, Any]) -> TrainConfig:
    """`base` with a trial's sampled hyperparameters in place (model ones as model_overrides)."""
    train = {name: TUNABLES[name].kind(value) for name, value in params.items() if not TUNABLES[name].in_model}
    model = {name: TUNABLES[name].kind(value) for name, value in params.items() if TUNABLES[name].in_model}
    return replace(base, **train, model_overrides={**base.model_overrides, **model})


# --- the sweep ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepConfig:
    """One sweep: the space, the data, where results go, and how trials are scheduled."""

    space: SearchSpace
    data: str
    output: str  # local folder for sweep.json, results, best/ and tune.png
    samples: int
    storage: str | None = None  # Tune's experiment and the trials' runs; default OUTPUT/_ray
    scheduler: str = "asha"
    metric: str = "val_auroc"
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    epochs: int | None = None  # overrides the space file's
    workers: int = 1  # per trial: a sweep gains more from trials side by side than from DDP
    use_gpu: bool = False
    cpus_per_worker: float | None = None
    max_concurrent: int | None = None
    seed: int = 0  # samples the space, and seeds every trial's training alike
    min_sensitivity: float = TrainConfig.min_sensitivity
    console: bool = False  # Tune's own console tables (--verbose); stdout is then not the summary's JSON alone

    def __post_init__(self) -> None:
        # Tune runs each trial in a folder of its own: a relative path would be looked up there.
        for name in ("data", "output", "storage"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, absolute_uri(getattr(self, name)))
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.metric not in METRIC_MODES:
            raise ValueError(f"metric must be one of {tuple(METRIC_MODES)}, got {self.metric!r}")
        for name in ("samples", "grace_period", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("epochs", "max_concurrent"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.cpus_per_worker is not None and self.cpus_per_worker < MIN_CPUS_PER_WORKER:
            raise ValueError(f"cpus_per_worker must be at least {MIN_CPUS_PER_WORKER}, got {self.cpus_per_worker}")

    @property
    def trial_epochs(self) -> int:
        return self.epochs or self.space.epochs

    @property
    def storage_uri(self) -> str:
        return self.storage or join_uri(self.output, RAY_DIR)

    def settings(self, fingerprint: str) -> dict[str, Any]:
        """What decides the sweep's trials and ranking; a rerun must match them to continue."""
        values = asdict(self)
        for name in ("data", "output", "storage", "cpus_per_worker", "max_concurrent", "console"):
            del values[name]
        values.update(space=self.space.to_dict(), epochs=self.trial_epochs, data_fingerprint=fingerprint)
        return values

    def base_train_config(self) -> TrainConfig:
        """Every trial's TrainConfig before its sampled values; ASHA, not patience, ends trials early."""
        return TrainConfig(
            model=self.space.model, data=self.data, output=self.output, workers=self.workers, use_gpu=self.use_gpu,
            epochs=self.trial_epochs, patience=self.trial_epochs, seed=self.seed, min_sensitivity=self.min_sensitivity,
        )






@dataclass(frozen=True)
class TrialResources:
    cpus_per_worker: float
    concurrent: int


def plan_resources(config: SweepConfig, cluster: Mapping[str, float]) -> TrialResources:
    """CPUs per worker and trials at once, such that they fit beside one CPU for Ray Data.

    Without `cpus_per_worker`, workers get the cluster's share for `max_concurrent` trials
    or, without that either, a whole CPU each (less on a cluster too small for one trial);
    concurrency is then what fits, capped by `max_concurrent`. Where not one trial fits and both
    are given, they are taken as they are: an autoscaling cluster (cluster.yaml) has no worker
    node before the sweep asks for one.
    """
    budget = cluster.get("CPU", 0.0) - CPUS_FOR_DATA
    cpus_per_worker = config.cpus_per_worker
    if cpus_per_worker is None:
        if config.max_concurrent is None and budget >= TRIAL_CPUS + config.workers:
            cpus_per_worker = 1.0
        else:
            share = budget / (config.max_concurrent or 1) - TRIAL_CPUS
            cpus_per_worker = max(MIN_CPUS_PER_WORKER, share / config.workers)
    trial_cpus = TRIAL_CPUS + config.workers * cpus_per_worker
    # The small tolerance keeps 1.0 / 0.5 from flooring to 1 through rounding.
    fits = math.floor(budget / trial_cpus + 1e-9)
    if config.use_gpu:
        fits = min(fits, math.floor(cluster.get("GPU", 0.0) / config.workers))
    if fits < 1 and config.cpus_per_worker is not None and config.max_concurrent is not None:
        log.warning("the cluster has %s now: the sweep waits for its autoscaler to add nodes", dict(cluster))
        return TrialResources(cpus_per_worker, config.max_concurrent)
    if fits < 1:
        gpus = f" and {config.workers} GPU(s)" if config.use_gpu else ""
        raise ValueError(
            f"a trial needs {trial_cpus:g} CPUs{gpus} beside {CPUS_FOR_DATA:g} for data reads; the cluster has {dict(cluster)} "
            "(on a cluster that scales up from none, give --cpus-per-worker and --max-concurrent: they are then not checked)"
        )
    return TrialResources(cpus_per_worker, min(fits, config.max_concurrent or fits))


@dataclass(frozen=True)
class TrialPlan:
    """What each trial needs besides its sampled values."""

    base: TrainConfig
    fingerprint: str
    cpus_per_worker: float
    trials_storage: str
    store_share: float  # of the object store, for a trial's cached data
    console_log_level: str  # of Ray Train's own lines: the sweep driver's, not the trial process's


def run_trial(params: dict[str, Any], plan: TrialPlan) -> None:
    """One trial: the sampled TrainConfig trained by the training system's TorchTrainer.

    The Train run is named after the trial, so a restored trial continues its own run.
    """
    config = trial_config(plan.base, params)
    loop = loop_config(config, plan.fingerprint, plan.cpus_per_worker, console_log_level=plan.console_log_level)
    trial_id = tune.get_context().get_trial_id()
    trainer = build_trainer(
        config, loop, plan.cpus_per_worker, plan.trials_storage, name=trial_id, callbacks=[TuneReportCallback()], store_share=plan.store_share
    )
    trainer.fit()


def trial_dirname(trial: Trial) -> str:
    """Trial folders named by id alone, so results, folders and Train runs match up."""
    return trial.trial_id


@ray.remote(num_cpus=0)
def state_api_problem() -> str | None:
    """Why a Ray worker cannot reach the state API the way Ray Train's cleaner does, if it cannot."""
    try:
        list_nodes(limit=1)
    except (ConnectionError, RayStateApiException) as exc:
        return str(exc)
    return None


def require_state_api() -> None:
    """Fail now rather than stall later.

    When Tune stops a trial (ASHA), the trial's Train controller dies with it, and Ray
    Train's placement-group cleaner, a detached actor, frees the trial's CPUs through Ray's
    state API, which it finds without an address. Where that fails, every stopped trial
    keeps its CPUs and the sweep hangs once they run out; a task tries the same lookup.
    """
    problem = ray.get(state_api_problem.remote())
    if problem is not None:
        raise RuntimeError(
            "Ray workers cannot reach Ray's state API, so the CPUs of stopped trials would never be freed. "
            "Run Ray with its dashboard; where several Ray instances share a machine, start this one with "
            f"RAY_API_SERVER_ADDRESS set to its dashboard URL. ({problem})"
        )


def check_settings(path: Path, settings: dict[str, Any]) -> None:
    """Record the sweep's settings, or refuse to continue a sweep made with others."""
    if not path.is_file():
        path.write_text(json.dumps(settings, indent=2) + "\n")
        return
    stored = json.loads(path.read_text())
    changed = sorted(key for key in stored.keys() | settings.keys() if stored.get(key) != settings.get(key))
    if changed:
        raise ValueError(f"{path.parent} holds a sweep with other {changed}; rerun with its settings or choose a new --output")


def build_tuner(config: SweepConfig, trainable: Any, concurrent: int) -> tune.Tuner:
    """A new Tuner, or the stored experiment restored (unfinished and errored trials resume)."""
    filesystem, storage_path = filesystem_for(config.storage_uri)
    experiment = str(PurePosixPath(storage_path) / SWEEP_NAME)
    if tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        log.warning("continuing the sweep stored in %s", join_uri(config.storage_uri, SWEEP_NAME))
        return tune.Tuner.restore(experiment, trainable, resume_errored=True, storage_filesystem=filesystem)
    scheduler = (
        ASHAScheduler(
            time_attr="training_iteration", max_t=config.trial_epochs, grace_period=config.grace_period,
            reduction_factor=REDUCTION_FACTOR,
        )
        if config.scheduler == "asha"
        else FIFOScheduler()
    )
    return tune.Tuner(
        trainable,
        param_space=config.space.param_space(),
        tune_config=tune.TuneConfig(
            metric=config.metric,
            mode=METRIC_MODES[config.metric],
            num_samples=config.samples,
            scheduler=scheduler,
            # Tune ignores max_concurrent_trials once given a search_alg: the generator caps it.
            search_alg=BasicVariantGenerator(max_concurrent=concurrent, random_state=config.seed),
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=SWEEP_NAME, storage_path=storage_path, storage_filesystem=filesystem, verbose=1 if config.console else 0
        ),
    )


def console_of(config: SweepConfig, output: Path) -> contextlib.AbstractContextManager:
    """Where Tune's console goes: the terminal with --verbose, else OUTPUT/tune-console.log.
    Tune prints its configuration box and trial tables to stdout whatever its `verbose` says,
    and the command's stdout is the sweep summary's JSON, which a script parses."""
    if config.console:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(output / CONSOLE_LOG, "a"))))
    return stack


def run_tune(config: SweepConfig) -> dict[str, Any]:
    """Run (or continue) the sweep on the current Ray cluster; write the results, best/ and the plot."""
    summary = load_summary(config.data)
    require_state_api()
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    check_settings(output / SETTINGS_FILE, config.settings(summary["fingerprint"]))
    resources = plan_resources(config, ray.cluster_resources())
    log.info("up to %d trials at once, %g CPUs per worker", resources.concurrent, resources.cpus_per_worker)
    plan = TrialPlan(
        base=config.base_train_config(),
        fingerprint=summary["fingerprint"],
        cpus_per_worker=resources.cpus_per_worker,
        trials_storage=join_uri(config.storage_uri, TRIALS_DIR),
        store_share=1 / resources.concurrent,
        console_log_level=ray_train_console_level(),
    )
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"cpu": TRIAL_CPUS})
    state = join_uri(config.storage_uri, SWEEP_NAME)
    try:
        with console_of(config, output), ctrl_c_interrupts():
            grid = build_tuner(config, trainable, resources.concurrent).fit()
    except KeyboardInterrupt:
        raise RuntimeError(f"the sweep was interrupted; rerun the same command to continue it from {state} (no results or best/ written)") from None

    table = results_table(grid, config, plan.base.select)
    table.to_parquet(output / "results.parquet", index=False)
    table.to_csv(output / "results.csv", index=False)
    finished = table[table["status"] != "error"].dropna(subset=[config.metric])
    if finished.empty:
        errors = table["error"].dropna()
        raise RuntimeError(
            f"no trial of the sweep finished an epoch (see {output / 'results.csv'})"
            + (f"; first error: {errors.iloc[0]}" if len(errors) else "")
        )
    (output / "tune.png").write_bytes(png_bytes(sweep_figure(table, config.space)))
    best = {key: value.item() if isinstance(value, np.generic) else value for key, value in finished.iloc[0].items()}
    filesystem, _ = filesystem_for(config.storage_uri)
    model_dir = output / BEST_DIR
    export_model_dir(
        Checkpoint(best["checkpoint"], filesystem=filesystem), model_dir, summary["preprocess"], config.min_sensitivity, plan.base.select,
        decode=summary.get("decode"),
    )
    return {
        "trials": len(table),
        "by_status": {status: int(count) for status, count in table["status"].value_counts().items()},
        "best": {key: best[key] for key in ("trial", *(param.name for param in config.space.params), config.metric)},
        "model_dir": str(model_dir),
        "results": str(output / "results.parquet"),
        "plot": str(output / "tune.png"),
    }


# --- results -------------------------------------------------------------------------------


def results_table(grid: tune.ResultGrid, config: SweepConfig, select: str) -> pd.DataFrame:
    """One row per trial: its values, epochs run, metrics at the epoch whose weights it would
    export (`select`, as training's: "last", or "best" validation AUROC), wall time; best first.

    Trials are ranked by that epoch's metric, so that the best trial's exported weights are the
    ones its rank was earned by (a trial's best epoch ranked it while its last was exported).
    status is "completed" (every epoch), "stopped" (by the scheduler) or "error".
    """
    names = [param.name for param in config.space.params]
    filesystem, _ = filesystem_for(config.storage_uri)
    rows = []
    for result in grid:
        epochs = trial_epochs(result.metrics_dataframe, result.metrics.get(CHECKPOINT_PATH_KEY), filesystem)
        sampled = result.config or {}  # empty for a trial that failed before its first report
        row: dict[str, Any] = {"trial": PurePosixPath(result.path).name, **{name: sampled.get(name) for name in names}}
        row["epochs"] = len(epochs)
        if len(epochs) and epochs[config.metric].notna().any():
            # "best" is training's: the epoch of the best validation AUROC (`Progress.record_epoch`).
            chosen = epochs.iloc[-1] if select == "last" else epochs.iloc[int(np.nanargmax(epochs["val_auroc"].to_numpy(dtype=float)))]
            row.update(selected_epoch=int(chosen["epoch"]), **{name: float(chosen[name]) for name in ("val_auroc", "val_loss", "train_loss")})
        row["wall_time_s"] = float(result.metrics.get("time_total_s", math.nan))
        row["status"] = "error" if result.error else "completed" if len(epochs) >= config.trial_epochs else "stopped"
        row["error"] = str(result.error) if result.error else None
        row["checkpoint"] = result.metrics.get(CHECKPOINT_PATH_KEY)
        rows.append(row)
    columns = ["trial", "status", *names, "epochs", "selected_epoch", "val_auroc", "val_loss", "train_loss", "wall_time_s", "error", "checkpoint"]
    table = pd.DataFrame(rows).reindex(columns=columns)
    ascending = METRIC_MODES[config.metric] == "min"
    return table.sort_values(by=config.metric, ascending=ascending, na_position="last", kind="stable").reset_index(drop=True)


def ctrl_c_interrupts() -> contextlib.AbstractContextManager[Any]:
    """Ctrl-C interrupts the sweep as a kill would. Tune's own handler stops the running trials
    and stores them as finished, so the rerun that README promises would never continue them;
    without it they stay "running" in the stored state, and a restore resumes them."""
    return mock.patch.dict(os.environ, {TUNE_SIGINT_SWITCH: "1"})


def trial_epochs(reported: pd.DataFrame | None, checkpoint: str | None, filesystem: FileSystem) -> pd.DataFrame:
    """A trial's epochs as its last checkpoint records them (`Progress.history`, what export
    reads): after an interrupted sweep resumes, Tune's own reports lack the epochs the trial's
    Train run had checkpointed but not yet reported. Tune's reports (the last of a repeated
    epoch) for a trial without a checkpoint."""
    if checkpoint:
        return pd.DataFrame(stored_progress(filesystem, f"{checkpoint}/{PROGRESS_FILE}").history)
    return pd.DataFrame() if reported is None else reported.drop_duplicates("epoch", keep="last")


def sweep_figure(table: pd.DataFrame, space: SearchSpace) -> Figure:
    """Validation AUROC (at each trial's selected epoch) against each searched hyperparameter.

    Trials that did not run every epoch are hollow; the best trial (first row) is a star.
    """
    columns = min(3, len(space.params))
    rows = math.ceil(len(space.params) / columns)
    figure = Figure(layout="constrained", figsize=(columns * PANEL_INCHES, rows * PANEL_INCHES * 0.8))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    scored = table.dropna(subset=["val_auroc"])
    for axis, param in zip(axes, space.params):
        x = scored[param.name].astype(float)
        stopped = (scored["status"] != "completed").to_numpy()
        axis.scatter(x[~stopped], scored["val_auroc"][~stopped], color="tab:blue", label="all epochs")
        axis.scatter(x[stopped], scored["val_auroc"][stopped], facecolors="none", edgecolors="tab:blue", label="stopped early")
        if len(scored):
            axis.scatter(x.iloc[:1], scored["val_auroc"].iloc[:1], marker="*", s=250, color="tab:orange", label="best", zorder=3)
        if param.dist == "loguniform" or param.name == "lr":
            axis.set_xscale("log")
            axis.xaxis.set_minor_formatter(NullFormatter())  # labels of minor ticks overlap on short ranges
        if TUNABLES[param.name].kind is bool:
            axis.set_xticks([0, 1], ["false", "true"])
        elif TUNABLES[param.name].kind is int:
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set(xlabel=param.name, ylabel="validation AUROC")
    for axis in axes[len(space.params) :]:
        axis.set_visible(False)
    axes[0].legend(loc="lower right")
    figure.suptitle(f"{space.model} sweep: {len(table)} trials")
    return figure
