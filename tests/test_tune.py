"""Sweeps: space files checked on load, resources planned, and whole Tune sweeps (ASHA, export, resume)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, SAMPLES
from pyarrow.fs import FileSelector
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

from lungray.evaluate import labelled_split
from lungray.ingest import IngestConfig, SourceSpec, run_ingest
from lungray.io.listing import filesystem_for, read_bytes
from lungray.modeldir import load_model_dir
from lungray.preprocess import PreprocessConfig
from lungray.train.loop import PROGRESS_FILE
from lungray.train.trainer import TrainConfig
from lungray.cli import add_tune_arguments, main, tune_config_from_args
from lungray.tune import (
    SETTINGS_FILE,
    SWEEP_NAME,
    ParamSpec,
    SearchSpace,
    SpaceError,
    SweepConfig,
    check_settings,
    load_space,
    plan_resources,
    results_table,
    run_tune,
    trial_config,
)

torch.set_num_threads(1)

SIZE = 64
SPACE_DIR = REPO / "tune_spaces"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_space(folder: Path, text: str) -> Path:
    path = folder / "space.yaml"
    path.write_text(text)
    return path


# --- space files ---------------------------------------------------------------------


def test_the_shipped_spaces_load() -> None:
    cnn = load_space(SPACE_DIR / "cnn.yaml")
    cnn_lstm = load_space(SPACE_DIR / "cnn_lstm.yaml")
    assert (cnn.model, cnn_lstm.model) == ("cnn", "cnn_lstm")
    common = {"lr", "dropout", "weight_decay", "batch_size"}
    assert {param.name for param in cnn.params} == common
    assert {param.name for param in cnn_lstm.params} == common | {"lstm_hidden", "lstm_layers", "bidirectional"}
    assert set(cnn_lstm.param_space()) == {param.name for param in cnn_lstm.params}


def test_exponents_without_a_dot_are_numbers(tmp_path: Path) -> None:
    """Plain YAML 1.1 would read 1e-4 as the string "1e-4"."""
    space = load_space(write_space(tmp_path, "model: cnn\nepochs: 2\nparams:\n  lr: {dist: loguniform, low: 1e-4, high: 3E-3}\n"))
    (lr,) = space.params
    assert (lr.low, lr.high) == (1e-4, 3e-3)


BAD_SPACES = {
    "unknown top-level key": ("model: cnn\nepochs: 2\nparams: {lr: {dist: choice, values: [0.001]}}\nseed: 1\n", r"unknown key\(s\) \['seed'\]"),
    "missing key": ("model: cnn\nparams: {lr: {dist: choice, values: [0.001]}}\n", r"missing key\(s\) \['epochs'\]"),
    "unknown model": ("model: resnet\nepochs: 2\nparams: {lr: {dist: choice, values: [0.001]}}\n", "model must be one of"),
    "epochs not an integer": ("model: cnn\nepochs: two\nparams: {lr: {dist: choice, values: [0.001]}}\n", "epochs must be a positive integer"),
    "no params": ("model: cnn\nepochs: 2\nparams: {}\n", "at least one hyperparameter"),
    "unknown hyperparameter": ("model: cnn\nepochs: 2\nparams: {learning_rate: {dist: choice, values: [0.001]}}\n", "params.learning_rate: unknown hyperparameter"),
    "not for this model": ("model: cnn\nepochs: 2\nparams: {lstm_hidden: {dist: choice, values: [64]}}\n", "params.lstm_hidden: does not apply to model cnn"),
    "unknown distribution": ("model: cnn\nepochs: 2\nparams: {lr: {dist: normal, low: 0.001, high: 0.01}}\n", "params.lr: unknown distribution 'normal'"),
    "unknown key in a parameter": ("model: cnn\nepochs: 2\nparams: {lr: {dist: uniform, low: 0.001, hi: 0.01}}\n", r"params.lr: unknown key\(s\) \['hi'\]"),
    "range with values": ("model: cnn\nepochs: 2\nparams: {lr: {dist: uniform, values: [0.001]}}\n", r"params.lr: unknown key\(s\) \['values'\]"),
    "empty range": ("model: cnn\nepochs: 2\nparams: {dropout: {dist: uniform, low: 0.3, high: 0.3}}\n", "params.dropout: empty range"),
    "inverted range": ("model: cnn\nepochs: 2\nparams: {lr: {dist: loguniform, low: 1e-2, high: 1e-4}}\n", "params.lr: inverted range"),
    "loguniform from zero": ("model: cnn\nepochs: 2\nparams: {weight_decay: {dist: loguniform, low: 0, high: 1e-3}}\n", "loguniform needs low > 0"),
    "empty values": ("model: cnn\nepochs: 2\nparams: {batch_size: {dist: choice, values: []}}\n", "values must be a non-empty list"),
    "wrong value type": ("model: cnn\nepochs: 2\nparams: {batch_size: {dist: choice, values: [16, 16.5]}}\n", "params.batch_size: value must be int, got 16.5"),
    "bool is not a number": ("model: cnn\nepochs: 2\nparams: {dropout: {dist: choice, values: [true]}}\n", "params.dropout: value must be float"),
    "range of an integer": ("model: cnn\nepochs: 2\nparams: {batch_size: {dist: uniform, low: 8, high: 64}}\n", "needs a real-valued hyperparameter"),
    "value the config refuses": ("model: cnn\nepochs: 2\nparams: {dropout: {dist: uniform, low: 0.2, high: 1.0}}\n", r"params.dropout: high 1.0 is not allowed: dropout must be in \[0, 1\)"),
    "not YAML": ("model: [cnn\n", "not valid YAML"),
    # PyYAML keeps a repeated key's last value: the first would vanish without a word.
    "a key given twice": ("model: cnn\nepochs: 4\nepochs: 30\nparams: {lr: {dist: choice, values: [0.001]}}\n", "the key 'epochs' is given twice"),
    "a hyperparameter given twice": (
        "model: cnn\nepochs: 2\nparams:\n  lr: {dist: choice, values: [0.001]}\n  lr: {dist: choice, values: [0.01]}\n", "the key 'lr' is given twice"
    ),
}


@pytest.mark.parametrize("case", BAD_SPACES, ids=list(BAD_SPACES))
def test_invalid_space_is_refused_naming_the_problem(tmp_path: Path, case: str) -> None:
    text, message = BAD_SPACES[case]
    path = write_space(tmp_path, text)
    with pytest.raises(SpaceError, match=message) as refused:
        load_space(path)
    assert str(refused.value).startswith(str(path))


# --- trial configs, resources, settings ------------------------------------------------


def test_trial_config_puts_model_values_into_the_architecture() -> None:
    base = TrainConfig(model="cnn_lstm", data="d", output="o", epochs=3, patience=3)
    config = trial_config(base, {"lr": 3e-4, "weight_decay": 1e-5, "batch_size": 16, "dropout": 0.25, "lstm_hidden": 32, "bidirectional": False})
    assert (config.lr, config.weight_decay, config.batch_size) == (3e-4, 1e-5, 16)
    architecture = config.model_config()
    assert (architecture.dropout, architecture.lstm_hidden, architecture.bidirectional) == (0.25, 32, False)
    hyperparameters = config.hyperparameters()
    assert hyperparameters["model_overrides"] == {"dropout": 0.25, "lstm_hidden": 32, "bidirectional": False}
    assert json.loads(json.dumps(hyperparameters)) == hyperparameters


def test_train_config_refuses_bad_model_overrides() -> None:
    with pytest.raises(ValueError, match="unknown model config keys"):
        TrainConfig(model="cnn", data="d", output="o", model_overrides={"hidden": 3})
    with pytest.raises(ValueError, match="arch"):
        TrainConfig(model="cnn", data="d", output="o", model_overrides={"arch": "cnn_lstm"})
    with pytest.raises(ValueError, match="weight_decay"):
        TrainConfig(model="cnn", data="d", output="o", weight_decay=-1.0)


def sweep(tmp_path: Path, **overrides: object) -> SweepConfig:
    space = load_space(SPACE_DIR / "cnn.yaml")
    return SweepConfig(**{"space": space, "data": "d", "output": str(tmp_path), "samples": 4, **overrides})


def test_resources_leave_a_cpu_for_data_and_cap_concurrency(tmp_path: Path) -> None:
    # The tests' machine: 0.1 CPU per trial function + 0.4 per worker, two trials beside one CPU for reads.
    assert plan_resources(sweep(tmp_path, cpus_per_worker=0.4, max_concurrent=3), {"CPU": 2.0}).concurrent == 2
    small = plan_resources(sweep(tmp_path), {"CPU": 2.0})
    assert small.concurrent == 1 and small.cpus_per_worker == pytest.approx(0.9)
    # A bigger cluster: whole CPUs per worker, as many trials as fit.
    big = plan_resources(sweep(tmp_path, workers=2), {"CPU": 16.0})
    assert (big.cpus_per_worker, big.concurrent) == (1.0, 7)
    shared = plan_resources(sweep(tmp_path, max_concurrent=2), {"CPU": 16.0})
    assert shared.concurrent == 2 and shared.cpus_per_worker == pytest.approx(7.5 - 0.1)
    assert plan_resources(sweep(tmp_path, use_gpu=True, workers=2), {"CPU": 16.0, "GPU": 5.0}).concurrent == 2
    with pytest.raises(ValueError, match="a trial needs"):
        plan_resources(sweep(tmp_path, cpus_per_worker=1.0), {"CPU": 2.0})
    with pytest.raises(ValueError, match="GPU"):
        plan_resources(sweep(tmp_path, use_gpu=True), {"CPU": 8.0})
    # cluster.yaml's head right after `ray up`: no CPU, no GPU; worker nodes come when asked for.
    cold = {"memory": 8e9, "object_store_memory": 2e9}
    with pytest.raises(ValueError, match="give --cpus-per-worker and --max-concurrent"):
        plan_resources(sweep(tmp_path, use_gpu=True, cpus_per_worker=3.0), cold)
    asked = plan_resources(sweep(tmp_path, use_gpu=True, cpus_per_worker=3.0, max_concurrent=4), cold)
    assert (asked.cpus_per_worker, asked.concurrent) == (3.0, 4)


def test_local_paths_are_made_absolute_for_the_trials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tune runs each trial in a folder of its own, where `out/data` would not be found."""
    monkeypatch.chdir(tmp_path)
    config = sweep(tmp_path, data="out/data", output="out/sweep", storage="s3://bucket/sweeps")
    assert config.data == str(tmp_path / "out" / "data") == config.base_train_config().data
    assert config.output == str(tmp_path / "out" / "sweep")
    assert config.storage == config.storage_uri == "s3://bucket/sweeps"
    assert sweep(tmp_path, output="out/sweep").storage_uri == str(tmp_path / "out" / "sweep" / "_ray")


def test_a_rerun_with_other_settings_is_refused(tmp_path: Path) -> None:
    config = sweep(tmp_path)
    check_settings(tmp_path / SETTINGS_FILE, config.settings("fingerprint"))
    # Where and how trials run may change; what decides them may not.
    check_settings(tmp_path / SETTINGS_FILE, sweep(tmp_path, max_concurrent=1, cpus_per_worker=0.5).settings("fingerprint"))
    with pytest.raises(ValueError, match=r"other \['samples'\]"):
        check_settings(tmp_path / SETTINGS_FILE, sweep(tmp_path, samples=8).settings("fingerprint"))
    with pytest.raises(ValueError, match="data_fingerprint"):
        check_settings(tmp_path / SETTINGS_FILE, config.settings("another"))


def tune_arguments(space: Path, data: str, output: Path, *extra: str) -> list[str]:
    return ["--space", str(space), "--data", data, "--output", str(output), "--cpus-per-worker", "0.4", "--max-concurrent", "2", *extra]


def test_cli_arguments_build_the_config(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)
    args = parser.parse_args(
        tune_arguments(SPACE_DIR / "cnn_lstm.yaml", "d", tmp_path, "--samples", "6", "--scheduler", "fifo", "--epochs", "2", "--storage", "s3://b/p")
    )
    config = tune_config_from_args(args)
    assert (config.space.model, config.samples, config.scheduler, config.trial_epochs) == ("cnn_lstm", 6, "fifo", 2)
    assert (config.cpus_per_worker, config.max_concurrent, config.storage_uri) == (0.4, 2, "s3://b/p")
    assert config.base_train_config().patience == 2  # ASHA, not patience, ends trials early


# --- whole sweeps on Ray Tune ----------------------------------------------------------


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> str:
    output = tmp_path_factory.mktemp("ingested") / "data"
    run_ingest(IngestConfig(sources=(SourceSpec(str(SAMPLES / "kermany-mini"), dataset="kermany"),), output=str(output), preprocess=PreprocessConfig(size=SIZE)))
    return str(output)


def val_images(data: str) -> np.ndarray:
    batches = labelled_split(data, "val", columns=("image",)).iter_batches(batch_format="numpy")
    return np.concatenate([batch["image"] for batch in batches])


# A learning rate of 1e-6 trains nothing: that trial trails the others at ASHA's rungs. It is
# last in the grid, so with two trials at a time it reaches each rung after trained ones.
# With three epochs, grace period 1 and reduction factor 2, ASHA decides after epochs 1 and 2.
# With two epochs it decided once, and on kermany-mini's 18 validation films a trained trial
# can read below the untrained one after one epoch (0.65 against 0.67): no trial was stopped
# in 2 of the last 3 full suites and in 1 run alone (2026-12-01). With three epochs, 3 of 3
# runs alone stopped one.
EPOCHS = 3
LR_GRID_SPACE = """model: cnn
epochs: {epochs}
params:
  lr: {{dist: grid, values: [3e-3, 1e-3, 3e-4, 1e-6]}}
  batch_size: {{dist: choice, values: [16]}}
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sweep_stops_trailing_trials_and_exports_the_best(ingested: str, tmp_path: Path) -> None:
    space = write_space(tmp_path, LR_GRID_SPACE.format(epochs=EPOCHS))
    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)
    output = tmp_path / "sweep"
    summary = run_tune(tune_config_from_args(parser.parse_args(tune_arguments(space, ingested, output, "--samples", "1"))))

    table = pd.read_parquet(output / "results.parquet")
    assert len(table) == summary["trials"] == 4
    assert sorted(table["lr"]) == sorted([3e-3, 1e-3, 3e-4, 1e-6])
    csv = pd.read_csv(output / "results.csv")
    assert list(csv.columns) == list(table.columns) and csv["trial"].tolist() == table["trial"].tolist()
    assert table["error"].isna().all()
    stopped = table[table["status"] == "stopped"]
    assert len(stopped) >= 1, f"ASHA stopped no trial:\n{table}"
    assert (stopped["epochs"] < EPOCHS).all() and (table.loc[table["status"] == "completed", "epochs"] == EPOCHS).all()
    assert table["val_auroc"].is_monotonic_decreasing  # best first
    assert (table["wall_time_s"] > 0).all()

    best = table.iloc[0]
    model = load_model_dir(output / "best")
    assert model.meta["training"]["lr"] == best["lr"]
    assert model.meta["history"][-1]["epoch"] == best["epochs"] - 1
    assert model.meta["history"][-1]["val_auroc"] == pytest.approx(best["val_auroc"], abs=1e-6)  # ranked by the exported epoch
    assert (table.loc[table["status"] == "completed", "selected_epoch"] == EPOCHS - 1).all()
    # Exported as `lungray train` exports: the last epoch's weights, thresholded on their val probabilities.
    assert model.meta["selected_epoch"] == best["epochs"] - 1
    assert model.meta["val_metrics"]["auroc"] == pytest.approx(model.meta["history"][-1]["val_auroc"], abs=1e-6)
    probabilities = model.predict_proba(val_images(ingested))
    assert probabilities.shape == (model.meta["val_metrics"]["n"],)
    assert np.all((probabilities >= 0) & (probabilities <= 1))
    assert (output / "tune.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("select, winner, auroc", [("last", "B", 0.93), ("best", "A", 0.95)])
def test_trials_are_ranked_by_the_epoch_whose_weights_are_exported(tmp_path: Path, select: str, winner: str, auroc: float) -> None:
    """Trial A's best epoch (0.95) outranked B (0.93 at its last), and A's last weights (0.60)
    were exported. The ranking is now by the metric of the epoch the export takes, as the
    trial's checkpoint records its epochs: B's Tune reports lack its first epoch (a resumed
    trial: checkpointed, not reported, before the interrupt) and it read "stopped" after 2."""
    space = SearchSpace("cnn", 3, (ParamSpec("lr", "loguniform", 1e-4, 1e-2),))
    config = SweepConfig(space=space, data="unused", output=str(tmp_path), samples=2, scheduler="fifo")

    def trial(name: str, lr: float, aurocs: list[float], reported_from: int = 0) -> SimpleNamespace:
        history = pd.DataFrame({"epoch": range(3), "val_auroc": aurocs, "val_loss": [0.5] * 3, "train_loss": [0.5] * 3})
        checkpoint = tmp_path / name / "checkpoint"
        checkpoint.mkdir(parents=True)
        progress = {"hyperparameters": {}, "data_fingerprint": "f", "architecture": {}, "history": history.to_dict("records")}
        (checkpoint / PROGRESS_FILE).write_text(json.dumps(progress))
        return SimpleNamespace(metrics_dataframe=history.iloc[reported_from:], config={"lr": lr}, path=str(tmp_path / name), error=None,
                               metrics={"time_total_s": 1.0, CHECKPOINT_PATH_KEY: str(checkpoint)})

    table = results_table([trial("A", 1e-2, [0.70, 0.95, 0.60]), trial("B", 1e-3, [0.80, 0.90, 0.93], reported_from=1)], config, select)
    assert (table.iloc[0]["trial"], table.iloc[0]["val_auroc"]) == (winner, auroc)
    assert table.iloc[0]["selected_epoch"] == (2 if select == "last" else 1)
    assert (table["epochs"] == 3).all() and (table["status"] == "completed").all()


def trial_results(experiment: str) -> dict[str, list[str]]:
    """Each trial's result.json lines (one per epoch it reported to Tune), read from the sweep's storage."""
    filesystem, path = filesystem_for(experiment)
    files = [info.path for info in filesystem.get_file_info(FileSelector(path, recursive=True)) if info.base_name == "result.json"]
    return {PurePosixPath(file).parent.name: read_bytes(f"s3://{file}").decode().splitlines() for file in files}


def terminated_trials(experiment: str) -> set[str]:
    """Trials that the stored experiment state records as finished (what a restore keeps)."""
    from ray.tune import ExperimentAnalysis

    filesystem, path = filesystem_for(experiment)
    try:
        trials = ExperimentAnalysis(path, storage_filesystem=filesystem).trials
    except (FileNotFoundError, ValueError):  # not written yet, or caught mid-write
        return set()
    return {trial.trial_id for trial in trials if trial.status == "TERMINATED"}


@pytest.fixture
def driver() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Sweep drivers started as processes of their own, joined to the tests' Ray; killed if left running."""
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_interrupted_sweep_on_s3_resumes(
    ingested: str, tmp_path: Path, s3_bucket: str, driver: list[subprocess.Popen[bytes]], capsys: pytest.CaptureFixture[str]
) -> None:
    """The driver is interrupted (Ctrl-C) once two trials have finished: it fails saying so, with
    no results or best/, and the same command then completes the sweep. (Tune's own Ctrl-C
    handler exported the best of two trials, exited 0, and stored the running trials as
    finished, so the rerun never ran them.)"""
    import ray

    space = write_space(tmp_path, LR_GRID_SPACE.format(epochs=EPOCHS))
    output = tmp_path / "sweep"
    storage = f"s3://{s3_bucket}/tune"
    experiment = f"{storage}/{SWEEP_NAME}"
    arguments = tune_arguments(space, ingested, output, "--samples", "1", "--scheduler", "fifo", "--storage", storage)
    code = (
        "import argparse, sys\n"
        "from lungray.raysession import init_ray\n"
        "from lungray.cli import add_tune_arguments, tune_config_from_args\n"
        "from lungray.tune import run_tune\n"
        "parser = argparse.ArgumentParser()\n"
        "add_tune_arguments(parser)\n"
        "init_ray(progress_bars=False)\n"
        "run_tune(tune_config_from_args(parser.parse_args(sys.argv[1:])))\n"
    )
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver.append(subprocess.Popen([sys.executable, "-c", code, *arguments], cwd=REPO, env=env, start_new_session=True, stderr=(tmp_path / "driver.err").open("wb")))

    deadline = time.monotonic() + 600
    while len(finished := terminated_trials(experiment)) < 2:
        assert driver[0].poll() is None, "the sweep ended before it could be interrupted"
        assert time.monotonic() < deadline, "no two trials finished in time"
        time.sleep(2)
    os.kill(driver[0].pid, signal.SIGINT)
    driver[0].wait(timeout=120)
    before = trial_results(experiment)
    assert len(terminated_trials(experiment)) < 4, "every trial had finished: nothing was interrupted"
    assert driver[0].returncode == 1
    assert "the sweep was interrupted; rerun the same command to continue it" in (tmp_path / "driver.err").read_text()
    assert not (output / "best").exists() and not (output / "results.parquet").exists()

    capsys.readouterr()
    assert main(["tune", *arguments]) == 0  # the same command, through the CLI: its stdout is the summary's JSON alone
    summary = json.loads(capsys.readouterr().out)  # (Tune's console tables went there too)

    table = pd.read_parquet(output / "results.parquet")
    assert summary["trials"] == len(table) == 4
    assert (table["status"] == "completed").all() and (table["epochs"] == EPOCHS).all()
    after = trial_results(experiment)
    for trial in finished:
        assert after[trial] == before[trial], f"finished trial {trial} was run again"
    assert load_model_dir(output / "best").meta["training"]["lr"] == table.iloc[0]["lr"]  # exported from its S3 checkpoint
    assert not (output / "_ray").exists()
