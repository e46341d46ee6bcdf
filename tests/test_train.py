"""Training: the worker loop's pieces in-process, and whole Ray Train runs (fit, fault, resume)."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO
from sklearn.metrics import roc_auc_score
from model_factory import TODAYS_DECODE
from ray.data.extensions import ArrowTensorArray
from ray.train import Checkpoint

from lungray.cli import add_train_arguments, build_parser, train_config_from_args
from lungray.io.listing import exists, filesystem_for, join_uri
from lungray.metrics import binary_metrics
from lungray.modeldir import META_FILE, load_model_dir, read_meta
from lungray.models import ModelConfig, build_model
from lungray.preprocess import PreprocessConfig
from lungray.screen.predictor import local_model_dir
from lungray.train.augment import AugmentConfig
from lungray.train.export import model_dir_contents
from lungray.train.loop import (
    COSINE_FINAL_LR_FRACTION, Progress, aim_schedule, evaluate_epoch, lr_schedule, moving_average, step_schedule, train_one_epoch, weighted_loss_sums, write_checkpoint,
)
from lungray.train.trainer import (
    RAY_DIR,
    RUN_NAME,
    TrainConfig,
    WholeValidationSplit,
    balanced_class_weights,
    check_resumable,
    labels_by_split,
    run_training,
    splits_bytes,
    training_datasets,
)

torch.set_num_threads(1)

SIZE = 64
SPLIT_SIZES = {"train": 32, "val": 12, "test": 12}


def synthetic_images(labels: list[int | None], size: int, rng: np.random.Generator) -> np.ndarray:
    """Noisy uint8 'films'; abnormal ones carry a bright blob, so the classes are learnable."""
    images = rng.normal(90, 20, size=(len(labels), size, size))
    rows, cols = np.mgrid[:size, :size]
    for image, label in zip(images, labels):
        if label == 1:
            centre = rng.integers(size // 4, 3 * size // 4, size=2)
            image[(rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 < (size // 6) ** 2] += 90
    return np.clip(images, 0, 255).astype(np.uint8)


def write_ingested(root: Path, split_sizes: dict[str, int] = SPLIT_SIZES, size: int = SIZE, seed: int = 0) -> Path:
    """A tiny dataset in the ingest's layout: data/*.parquet (tensor `image`, content_hash, int8
    `label` with nulls, split, patient_key, study_id, source, path) and summary.json. Each split gets one
    unlabelled image, which training and evaluation must skip."""
    rng = np.random.default_rng(seed)
    (root / "data").mkdir(parents=True)
    paths = []
    for split, n in split_sizes.items():
        labels = [index % 2 for index in range(n)] + [None]
        paths += [f"synthetic/{split}/{index}.png" for index in range(len(labels))]
        images = synthetic_images(labels, size, rng)
        table = pa.table(
            {
                "image": ArrowTensorArray.from_numpy(images),
                "content_hash": pa.array([hashlib.sha256(image.tobytes()).hexdigest()[:32] for image in images]),  # as rows.process_file
                "label": pa.array(labels, pa.int8()),
                "split": pa.array([split] * len(labels)),
                "patient_key": pa.array([f"{split}-patient-{index}" for index in range(len(labels))]),
                "study_id": pa.array([f"{split}-study-{index}" for index in range(len(labels))]),
                "source": pa.array(["synthetic"] * len(labels)),
                "path": pa.array(paths[-len(labels) :]),
            }
        )
        pq.write_table(table, root / "data" / f"{split}.parquet")
    summary = {
        "preprocess": PreprocessConfig(size=size).to_dict(),
        "decode": TODAYS_DECODE,
        "fingerprint": hashlib.sha256("\n".join(paths).encode()).hexdigest(),
        "splits": {split: {"images": n + 1} for split, n in split_sizes.items()},
        "by_status": {"ok": sum(n + 1 for n in split_sizes.values())},
    }
    (root / "summary.json").write_text(json.dumps(summary))
    return root


def read_split(data: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of a split's labelled rows, read with pyarrow, independently of Ray Data."""
    table = pq.read_table(data / "data" / f"{split}.parquet")
    labelled = table.filter(table["label"].is_valid())
    return labelled["image"].combine_chunks().to_numpy(), labelled["label"].to_numpy().astype(np.int64)


def tiny_config(data: Path, output: Path, model: str = "cnn", **overrides: object) -> TrainConfig:
    """Two gloo workers at half a CPU each: on 2 cores, whole CPUs would starve Ray Data's reads."""
    settings = {"workers": 2, "epochs": 2, "batch_size": 8, "cpus_per_worker": 0.5, "patience": 10, **overrides}
    return TrainConfig(model=model, data=str(data), output=str(output), **settings)


# --- configuration and resume checks ---------------------------------------------------


def test_cli_arguments_build_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(
        ["--model", "cnn_lstm", "--data", "d", "--output", "o", "--epochs", "3", "--gpu", "--no-augment", "--min-sensitivity", "0.9",
         "--label-smoothing", "0.05", "--ema-decay", "0", "--mixup-alpha", "0.2", "--schedule", "cosine", "--select", "best"]
    )
    config = train_config_from_args(args)
    assert (config.label_smoothing, config.ema_decay, config.mixup_alpha, config.schedule) == (0.05, 0.0, 0.2, "cosine")
    assert config.select == "best"
    assert (config.model, config.data, config.output, config.epochs) == ("cnn_lstm", "d", "o", 3)
    assert config.use_gpu and not config.augment.enabled
    assert config.min_sensitivity == 0.9


@pytest.mark.parametrize(("argv", "verbose"), [([], False), (["-v"], True), (["--verbose"], True)])
def test_verbose_is_taken_before_the_command_and_after_it_as_the_jobs_pass_it(argv: list[str], verbose: bool) -> None:
    command = ["train", "--model", "cnn", "--data", "d", "--output", "o"]
    assert build_parser().parse_args([*argv, *command]).verbose is verbose
    assert build_parser().parse_args([*command, *argv]).verbose is verbose


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="model"):
        TrainConfig(model="resnet", data="d", output="o")
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(model="cnn", data="d", output="o", epochs=0)
    with pytest.raises(ValueError, match="mixup_alpha"):
        TrainConfig(model="cnn", data="d", output="o", mixup_alpha=-0.1)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(model="cnn", data="d", output="o", schedule="step")
    with pytest.raises(ValueError, match="select"):
        TrainConfig(model="cnn", data="d", output="o", select="first")


def test_hyperparameters_leave_out_where_and_how_it_runs() -> None:
    config = TrainConfig(model="cnn", data="d", output="o", max_failures=5, cpus_per_worker=0.5)
    hyperparameters = config.hyperparameters()
    assert {"data", "output", "max_failures", "cpus_per_worker", "fail_at_epoch", "size"}.isdisjoint(hyperparameters)
    assert hyperparameters["augment"] == AugmentConfig().to_dict()
    assert json.loads(json.dumps(hyperparameters)) == hyperparameters


def test_resume_allows_more_epochs_but_not_other_settings() -> None:
    config = TrainConfig(model="cnn", data="d", output="o", epochs=2)
    stored = Progress(config.hyperparameters(), "fingerprint", {})
    check_resumable(stored, replace(config, epochs=5, patience=9, select="best"), "fingerprint")  # export-only settings may change
    with pytest.raises(ValueError, match="batch_size"):
        check_resumable(stored, replace(config, batch_size=64), "fingerprint")
    with pytest.raises(ValueError, match="other data"):
        check_resumable(stored, config, "another fingerprint")


def test_a_run_stored_before_newer_settings_still_resumes() -> None:
    """Runs written before weight decay and model overrides existed lack those keys: at their
    defaults they are the same run, at other values they are not."""
    config = TrainConfig(model="cnn_lstm", data="d", output="o")
    older = {key: value for key, value in config.hyperparameters().items() if key not in ("weight_decay", "model_overrides")}
    check_resumable(Progress(older, "fingerprint", {}), config, "fingerprint")
    with pytest.raises(ValueError, match="weight_decay"):
        check_resumable(Progress(older, "fingerprint", {}), replace(config, weight_decay=1e-4), "fingerprint")


def test_a_run_stored_before_the_site_robust_defaults_is_read_as_it_was() -> None:
    """A run stored before label smoothing, weight averaging and the crop/border/window/erase
    augmentation trained without them: it must not pass for a run of today's defaults."""
    config = TrainConfig(model="cnn", data="d", output="o")
    older = {key: value for key, value in config.hyperparameters().items() if key not in ("label_smoothing", "ema_decay")}
    older["augment"] = {
        key: value for key, value in older["augment"].items()
        if key not in ("crop_area", "crop_aspect", "border_prob", "window_prob", "erase_prob")
    }
    with pytest.raises(ValueError, match="augment.*ema_decay.*label_smoothing"):
        check_resumable(Progress(older, "fingerprint", {}), config, "fingerprint")
    off = replace(
        config, label_smoothing=0.0, ema_decay=0.0,
        augment=replace(config.augment, crop_area=0.0, crop_aspect=0.0, border_prob=0.0, window_prob=0.0, erase_prob=0.0),
    )
    check_resumable(Progress(older, "fingerprint", {}), off, "fingerprint")


def test_a_run_stored_before_mixup_and_schedules_trained_without_mixup_on_the_plateau_schedule() -> None:
    config = TrainConfig(model="cnn", data="d", output="o", schedule="plateau")
    older = {key: value for key, value in config.hyperparameters().items() if key not in ("mixup_alpha", "schedule")}
    check_resumable(Progress(older, "fingerprint", {}), config, "fingerprint")
    with pytest.raises(ValueError, match="mixup_alpha.*schedule"):
        check_resumable(Progress(older, "fingerprint", {}), replace(config, mixup_alpha=0.2, schedule="cosine"), "fingerprint")
    # Today's default schedule is cosine: such a run does not pass for one of today's defaults.
    with pytest.raises(ValueError, match="schedule"):
        check_resumable(Progress(older, "fingerprint", {}), TrainConfig(model="cnn", data="d", output="o"), "fingerprint")


def test_class_weights_balance_the_train_labels() -> None:
    weights = balanced_class_weights({"train": np.array([0, 0, 0, 1]), "val": np.array([0, 1])})
    assert weights == pytest.approx((4 / 6, 4 / 2))
    with pytest.raises(ValueError, match="val split"):
        balanced_class_weights({"train": np.array([0, 1]), "val": np.array([1, 1])})


def test_labels_by_split_skips_unlabelled_rows(tmp_path: Path) -> None:
    labels = labels_by_split(str(write_ingested(tmp_path / "data")))
    assert {name: len(values) for name, values in labels.items()} == {"train": SPLIT_SIZES["train"], "val": SPLIT_SIZES["val"]}


# --- the loop's pieces, in-process -----------------------------------------------------


def toy_batches(data: Path, split: str, batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    images, labels = read_split(data, split)
    return [
        {"image": torch.from_numpy(images[start : start + batch_size]), "label": torch.from_numpy(labels[start : start + batch_size])}
        for start in range(0, len(labels), batch_size)
    ]


def test_train_one_epoch_learns_separable_data(tmp_path: Path) -> None:
    data = write_ingested(tmp_path / "data")
    torch.manual_seed(0)
    model = build_model(ModelConfig("cnn", widths=(8, 16), fc_hidden=16, dropout=0.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    weights = torch.ones(2)
    batches = toy_batches(data, "train")
    shards = [
        train_one_epoch(model, batches, optimizer, weights, AugmentConfig(enabled=False), torch.Generator().manual_seed(epoch), False)
        for epoch in range(8)
    ]
    assert shards[0].images == SPLIT_SIZES["train"]
    assert shards[-1].loss_sum / shards[-1].weight_sum < 0.5 * shards[0].loss_sum / shards[0].weight_sum


def test_probability_targets_weigh_each_image_by_its_mix_of_class_weights() -> None:
    """One-hot targets give torch's class-index loss and weights; a mixed target gives
    -sum_c w_c y_c log p_c (label smoothing applied to the targets first), weighed by sum_c w_c y_c."""
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 2), torch.tensor([0, 1, 1, 0, 1, 1])
    weights = torch.tensor([1.5, 0.75])
    one_hot = torch.nn.functional.one_hot(labels, 2).float()
    for smoothing in (0.0, 0.1):
        by_index = weighted_loss_sums(logits, labels, weights, smoothing)
        by_probability = weighted_loss_sums(logits, one_hot, weights, smoothing)
        torch.testing.assert_close(by_probability, by_index)
    mixed = 0.7 * one_hot + 0.3 * one_hot.roll(1, 0)
    loss_sum, weight_sum = weighted_loss_sums(logits, mixed, weights, 0.1)
    smoothed = mixed * 0.9 + 0.1 / 2
    expected = -(weights * smoothed * torch.log_softmax(logits, 1)).sum()
    torch.testing.assert_close(loss_sum, expected)
    torch.testing.assert_close(weight_sum, (mixed * weights).sum())


def test_mixup_trains_on_each_batch_blended_with_itself_rolled_by_one(tmp_path: Path) -> None:
    data = write_ingested(tmp_path / "data")
    torch.manual_seed(0)
    model = build_model(ModelConfig("cnn", widths=(4, 8), fc_hidden=8, dropout=0.0))
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    batches = toy_batches(data, "train")
    shard = train_one_epoch(model, batches, torch.optim.Adam(model.parameters(), lr=1e-3), torch.ones(2),
                            AugmentConfig(enabled=False), torch.Generator().manual_seed(0), False, mixup_alpha=0.4)
    assert len(seen) == len(batches) and np.isfinite(shard.loss_sum)
    lams = []
    for batch, inputs in zip(batches, seen):
        images = batch["image"].float().div(255).unsqueeze(1)
        rolled = images.roll(1, 0)
        # inputs = lam * images + (1 - lam) * rolled: solve for lam by least squares, then check the fit.
        difference = (images - rolled).flatten()
        lam = float(((inputs - rolled).flatten() @ difference) / (difference @ difference))
        torch.testing.assert_close(inputs, lam * images + (1 - lam) * rolled, atol=1e-5, rtol=0)
        lams.append(lam)
    assert all(0.0 <= lam <= 1.0 for lam in lams) and len(set(round(lam, 6) for lam in lams)) > 1


def test_schedules_cosine_decays_to_one_percent_and_plateau_halves_on_a_stall() -> None:
    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)

    cosine = lr_schedule(cosine_optimizer := optimizer(), "cosine", epochs=10)
    rates = []
    for _ in range(10):
        cosine_optimizer.step()
        step_schedule(cosine, val_loss=1.0)
        rates.append(cosine_optimizer.param_groups[0]["lr"])
    assert rates == sorted(rates, reverse=True) and rates[-1] == pytest.approx(1e-5)
    plateau = lr_schedule(plateau_optimizer := optimizer(), "plateau", epochs=10)
    for val_loss in (1.0, 0.9, 0.95, 0.95):  # two epochs without a better loss: halved once
        plateau_optimizer.step()
        step_schedule(plateau, val_loss)
    assert plateau_optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)


@pytest.mark.parametrize("first_epochs, epochs", [(1, 3), (2, 5), (3, 3)])
def test_a_cosine_schedule_resumed_for_more_epochs_follows_the_longer_run(first_epochs: int, epochs: int) -> None:
    """A rerun with more --epochs restored the old schedule: after `epochs` 1 the rate of a
    3-epoch run went 1e-3, 1e-5, 1e-3. The oracle is torch's own cosine schedule of the
    longer run, stepped straight through."""

    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)

    first = lr_schedule(first_optimizer := optimizer(), "cosine", epochs=first_epochs)
    for _ in range(first_epochs):
        first_optimizer.step()
        step_schedule(first, val_loss=1.0)
    resumed = lr_schedule(resumed_optimizer := optimizer(), "cosine", epochs=epochs)
    resumed_optimizer.load_state_dict(first_optimizer.state_dict())
    resumed.load_state_dict(first.state_dict())
    aim_schedule(resumed, epochs)
    straight = torch.optim.lr_scheduler.CosineAnnealingLR(straight_optimizer := optimizer(), T_max=epochs, eta_min=1e-5)
    for _ in range(first_epochs):
        straight_optimizer.step()
        straight.step()
    for _ in range(epochs - first_epochs + 1):
        assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(straight_optimizer.param_groups[0]["lr"], rel=1e-9)
        resumed_optimizer.step()
        step_schedule(resumed, val_loss=1.0)
        straight_optimizer.step()
        straight.step()


def test_a_checkpoint_of_an_older_lungray_exports_its_best_weights_and_refuses_the_last(tmp_path: Path) -> None:
    """Checkpoints written before the last epoch's weights were kept hold only the best epoch's."""
    architecture = ModelConfig("cnn", widths=(4, 8), fc_hidden=8)
    weights = build_model(architecture).state_dict()
    record = {"epoch": 0, "train_loss": 0.7, "val_loss": 0.6, "val_auroc": 0.8, "lr": 1e-3, "seconds": 1.0, "images_per_s": 1.0, "peak_rss_mb": 1.0}
    progress = Progress(TrainConfig(model="cnn", data="d", output="o").hyperparameters(), "fingerprint", architecture.to_dict())
    progress.record_epoch(record)
    write_checkpoint(tmp_path, progress, {
        "best_model": weights, "best_val_prob": torch.tensor([0.2, 0.9, 0.7]), "best_val_label": torch.tensor([0, 1, 1]),
    })
    checkpoint = Checkpoint.from_directory(tmp_path)
    preprocess = PreprocessConfig().to_dict()
    with pytest.raises(ValueError, match="--select best"):
        model_dir_contents(checkpoint, preprocess, 0.95, "last", decode=None)
    exported, meta = model_dir_contents(checkpoint, preprocess, 0.95, "best", decode=None)
    assert exported is not None and meta["selected_epoch"] == 0 and meta["training"]["select"] == "best"
    assert meta["val_metrics"]["n"] == 3


def test_train_one_epoch_keeps_an_exponential_moving_average_of_the_weights(tmp_path: Path) -> None:
    """After k steps the average is the EMA of the k weight vectors the optimizer produced:
    w_1 at the first step, then d_t * avg + (1 - d_t) * w_t with the warm-up
    d_t = min(decay, (1 + n) / (10 + n)), n the updates before (recomputed here from snapshots)."""
    data = write_ingested(tmp_path / "data")
    torch.manual_seed(0)
    model = build_model(ModelConfig("cnn", widths=(4, 8), fc_hidden=8, dropout=0.0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    average = moving_average(model, decay=0.9)
    assert moving_average(model, decay=0.0) is None

    snapshots = []
    original_step = optimizer.step

    def step_and_snapshot(*args: Any, **kwargs: Any) -> Any:
        result = original_step(*args, **kwargs)
        snapshots.append(model.head[-1].weight.detach().clone())
        return result

    optimizer.step = step_and_snapshot  # type: ignore[method-assign]
    train_one_epoch(model, toy_batches(data, "train", batch_size=4), optimizer, torch.ones(2), AugmentConfig(enabled=False),
                    torch.Generator().manual_seed(0), False, label_smoothing=0.1, average=average)
    expected = snapshots[0]
    for n, weights in enumerate(snapshots[1:], start=1):
        step_decay = min(0.9, (1 + n) / (10 + n))
        expected = step_decay * expected + (1 - step_decay) * weights
    assert len(snapshots) > 2
    torch.testing.assert_close(average.module.head[-1].weight, expected)
    assert not torch.allclose(average.module.head[-1].weight, model.head[-1].weight)


@pytest.mark.parametrize("use_gpu", [False, True])
def test_evaluate_epoch_weighted_loss_and_probabilities(tmp_path: Path, use_gpu: bool) -> None:
    """Also as a GPU run validates (on CPU here): in float32, as every scorer scores, though
    training runs in bfloat16 there; the probabilities choose the exported threshold."""
    data = write_ingested(tmp_path / "data")
    torch.manual_seed(0)
    model = build_model(ModelConfig("cnn_lstm", widths=(4, 8), lstm_hidden=8)).eval()
    weights = torch.tensor([0.5, 2.0])
    shard = evaluate_epoch(model, toy_batches(data, "val", batch_size=5), weights, use_gpu)

    images, labels = read_split(data, "val")
    with torch.no_grad():
        logits = model(torch.from_numpy(images).float().div(255).unsqueeze(1))
    np.testing.assert_array_equal(shard.label, labels)
    np.testing.assert_allclose(shard.prob, torch.softmax(logits, 1)[:, 1].numpy(), rtol=1e-5, atol=1e-6)
    expected_loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels), weight=weights).item()
    assert shard.loss_sum / shard.weight_sum == pytest.approx(expected_loss, rel=1e-5)


@pytest.mark.timeout(120)
def test_validation_shards_cover_every_row_and_train_shards_are_equal(ray_session: None) -> None:
    import ray.data

    datasets = {"train": ray.data.range(101, override_num_blocks=7), "val": ray.data.range(23, override_num_blocks=5)}
    shards = WholeValidationSplit().configure(datasets, world_size=2, worker_handles=None, worker_node_ids=None)

    def ids(iterator: ray.data.DataIterator) -> list[int]:
        return [row["id"] for row in iterator.iter_rows()]

    # streaming_split iterators are consumed together, one thread each.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        val_ids = list(pool.map(ids, [shard["val"] for shard in shards]))
        train_ids = list(pool.map(ids, [shard["train"] for shard in shards]))
    assert sorted(val_ids[0] + val_ids[1]) == list(range(23))
    assert len(train_ids[0]) == len(train_ids[1])


@pytest.mark.timeout(120)
def test_splits_that_fit_a_quarter_of_the_object_store_are_read_once(ray_session: None, tmp_path: Path) -> None:
    from ray.data.dataset import MaterializedDataset

    data = write_ingested(tmp_path / "data")
    needed = splits_bytes(json.loads((data / "summary.json").read_text()), ["train", "val"])
    assert needed == (SPLIT_SIZES["train"] + 1 + SPLIT_SIZES["val"] + 1) * SIZE * SIZE  # uint8, unlabelled rows counted
    cached = training_datasets(str(data), object_store_bytes=4 * needed)
    streamed = training_datasets(str(data), object_store_bytes=4 * needed - 1)
    assert all(isinstance(dataset, MaterializedDataset) for dataset in cached.values())
    assert not any(isinstance(dataset, MaterializedDataset) for dataset in streamed.values())
    for split in ("train", "val"):  # the cached rows are the split's labelled rows, as streamed
        images, labels = read_split(data, split)
        rows = cached[split].take_all()
        assert sorted(int(row["label"]) for row in rows) == sorted(labels.tolist())
        assert sorted(row["image"].tobytes() for row in rows) == sorted(image.tobytes() for image in images)


def test_an_output_holding_another_kind_of_model_directory_is_refused(tmp_path: Path) -> None:
    """An ensemble's model.json has no training record (KeyError: 'training'); a calibrated
    one inherits its parent's, and would have read "already holds this model; nothing to do"."""
    from test_modeldir import make_model_dir

    from lungray.train.trainer import is_exported

    config = TrainConfig(model="cnn", data="d", output="o")
    ensemble_like = make_model_dir(tmp_path / "ensemble")
    derived = make_model_dir(tmp_path / "calibrated")
    meta = json.loads((derived / "model.json").read_text())
    (derived / "model.json").write_text(json.dumps({**meta, "training": config.hyperparameters(), "lineage": [{"step": "calibrate"}]}))
    for output in (ensemble_like, derived):
        with pytest.raises(FileExistsError, match="not written by `lungray train`; choose another --output"):
            is_exported(str(output), config, "fingerprint")


@pytest.mark.timeout(120)
def test_each_worker_trains_on_both_classes_when_the_ingest_stored_them_apart(ray_session: None, tmp_path: Path) -> None:
    """The ingest stores rows by label; Ray Train splits the train split into contiguous
    shares (streaming_split, equal), so without a shuffle one of two workers saw abnormal
    films alone, cached or streamed."""
    data = write_ingested(tmp_path / "data", split_sizes={"train": 200, "val": 10, "test": 4})
    stored = pq.read_table(data / "data" / "train.parquet")
    pq.write_table(stored.take(np.argsort(stored["label"].fill_null(-1).to_numpy(), kind="stable")), data / "data" / "train.parquet")
    needed = splits_bytes(json.loads((data / "summary.json").read_text()), ["train", "val"])
    from concurrent.futures import ThreadPoolExecutor

    for store in (4 * needed, 4 * needed - 1):
        datasets = training_datasets(str(data), object_store_bytes=store)
        shards = WholeValidationSplit().configure(datasets, world_size=2, worker_handles=None, worker_node_ids=None)
        with ThreadPoolExecutor(2) as pool:
            labels = list(pool.map(lambda shard: [int(row["label"]) for row in shard["train"].iter_rows()], shards))
        assert sorted(labels[0] + labels[1]) == [0] * 100 + [1] * 100
        assert all(0.35 < np.mean(share) < 0.65 for share in labels), [np.mean(share) for share in labels]


# --- whole runs on Ray Train -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("model", ["cnn", "cnn_lstm"])
def test_two_worker_fit_exports_a_model_directory(ray_session: None, tmp_path: Path, model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_ingested(tmp_path / "data")
    output = run_training(tiny_config(data, tmp_path / "model", model=model))

    loaded = load_model_dir(output)
    meta = loaded.meta
    assert meta["architecture"]["arch"] == model
    assert meta["preprocess"] == json.loads((data / "summary.json").read_text())["preprocess"]
    assert meta["data_fingerprint"] == json.loads((data / "summary.json").read_text())["fingerprint"]
    assert [record["epoch"] for record in meta["history"]] == [0, 1]
    assert meta["epochs_trained"] == 2 and meta["resumed_at_epochs"] == []
    best = max(meta["history"], key=lambda record: record["val_auroc"])
    assert meta["best_epoch"] == best["epoch"]
    assert meta["training"]["select"] == "last" and meta["selected_epoch"] == 1  # the default exports the last epoch's weights
    assert meta["val_metrics"]["n"] == SPLIT_SIZES["val"]  # the whole val set, gathered from both workers
    assert meta["val_metrics"]["auroc"] == pytest.approx(meta["history"][-1]["val_auroc"], abs=1e-6)
    val_images, val_labels = read_split(data, "val")
    probabilities = loaded.predict_proba(val_images)
    # The exported weights are the ones that validated: they give the recorded val AUROC (sklearn).
    assert roc_auc_score(val_labels, probabilities) == pytest.approx(meta["val_metrics"]["auroc"], abs=1e-4)
    assert meta["val_metrics"]["recall"] >= meta["training"]["min_sensitivity"]
    assert meta["n_parameters"] > 0 and meta["peak_memory_mb"] > 0
    assert set(meta["versions"]) == {"lungray", "torch", "ray", "python"}
    assert meta["hardware"] == {"workers": 2, "device": "CPU", "threads_per_worker": 1, "backend": "gloo"}

    # The finished run re-exported with the best epoch's weights from its stored checkpoint: no worker started.
    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a finished run started Ray Train to be exported again")

    monkeypatch.setattr("lungray.train.trainer.build_trainer", no_training)
    run_training(tiny_config(data, tmp_path / "model", model=model, select="best"))
    reexported = read_meta(output)
    assert reexported["training"]["select"] == "best" and reexported["selected_epoch"] == best["epoch"]
    assert reexported["history"] == meta["history"]
    assert reexported["val_metrics"]["auroc"] == pytest.approx(best["val_auroc"], abs=1e-6)
    best_weights = load_model_dir(output).predict_proba(val_images)
    assert roc_auc_score(val_labels, best_weights) == pytest.approx(best["val_auroc"], abs=1e-4)

    assert probabilities.shape == val_labels.shape
    assert np.all((probabilities >= 0) & (probabilities <= 1))
    # The stored val metrics describe the exported weights, scored the way screening scores.
    assert binary_metrics(val_labels, probabilities, loaded.threshold)["auroc"] == pytest.approx(meta["val_metrics"]["auroc"], abs=1e-6)


# Lines Ray Train and Ray Data print for every run, epoch and dataset unless asked (--verbose),
# and the deprecation warning Ray Train's default data options printed on every run.
RAY_RUN_LINES = (
    "Reporting training result", "Checkpoint successfully created", "Started training worker group", "execution finished",
    "Progress bars disabled", "RayDeprecationWarning",
)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_cli_prints_a_line_per_epoch_and_none_of_rays_run_lines(tmp_path: Path, ray_tmpdir: Path) -> None:
    """`lungray train` in a local Ray of its own, as `make demo` runs it."""
    data = write_ingested(tmp_path / "data")
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": str(ray_tmpdir), "PYTHONPATH": str(REPO)}
    command = [
        sys.executable, "-m", "lungray.cli", "train", "--model", "cnn", "--data", str(data), "--output", str(tmp_path / "model"),
        "--epochs", "2", "--batch-size", "8", "--cpus-per-worker", "0.5", "--patience", "10",
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    epochs = [match.group(1, 2, 3) for match in re.finditer(r"train: epoch (\d+)/(\d+) · .* val AUROC ([0-9.]+)", console)]
    history = read_meta(tmp_path / "model")["history"]
    # Once each (Ray Train's print redirection printed each twice), with the AUROC the model directory records.
    assert epochs == [(str(record["epoch"] + 1), "2", f"{record['val_auroc']:.3f}") for record in history]
    assert [line for line in RAY_RUN_LINES if line in console] == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_worker_restarts_from_the_last_checkpoint(ray_session: None, tmp_path: Path) -> None:
    data = write_ingested(tmp_path / "data")
    config = tiny_config(data, tmp_path / "model", epochs=3, fail_at_epoch=1, max_failures=1)

    meta = read_meta(run_training(config))

    assert (tmp_path / "model" / RAY_DIR / "fault-injected").exists(), "the worker was never killed"
    assert [record["epoch"] for record in meta["history"]] == [0, 1, 2]
    assert meta["resumed_at_epochs"] == [1], "training started over instead of continuing from epoch 0's checkpoint"


def stored_meta(output: str) -> dict[str, Any]:
    """model.json of a model directory, local or on S3, read as a scorer reads it."""
    return read_meta(local_model_dir(output))


def exported_at(output: str) -> int:
    filesystem, path = filesystem_for(join_uri(output, META_FILE))
    return filesystem.get_file_info(path).mtime_ns


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("where", ["local", "s3"])
def test_rerun_resumes_instead_of_restarting(ray_session: None, tmp_path: Path, where: str, request: pytest.FixtureRequest) -> None:
    """On S3 too: a cluster's workers checkpoint there, and the model directory is written there."""
    data = write_ingested(tmp_path / "data")
    output = str(tmp_path / "model") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/models/cnn"
    first = stored_meta(run_training(tiny_config(data, output, epochs=1)))
    first_export = exported_at(output)

    run_training(tiny_config(data, output, epochs=1))  # finished and exported: nothing to do
    assert exported_at(output) == first_export

    longer = stored_meta(run_training(tiny_config(data, output, epochs=2)))
    assert [record["epoch"] for record in longer["history"]] == [0, 1]
    assert longer["history"][:1] == first["history"], "the first epoch was recomputed"
    assert longer["resumed_at_epochs"] == [1]
    assert longer["training"]["epochs"] == 2
    config = tiny_config(data, output, epochs=2)  # its second epoch at the rate a 2-epoch run has there, not the 1-epoch floor
    halfway = COSINE_FINAL_LR_FRACTION * config.lr + (1 - COSINE_FINAL_LR_FRACTION) * config.lr * (1 + math.cos(math.pi / 2)) / 2
    assert config.schedule == "cosine" and longer["history"][1]["lr"] == pytest.approx(halfway)
    assert exists(join_uri(output, RAY_DIR, RUN_NAME))
    assert load_model_dir(local_model_dir(output)).predict_proba(read_split(data, "val")[0]).shape == (SPLIT_SIZES["val"],)
