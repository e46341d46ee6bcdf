"""`lungray compare`: CNN vs CNN-LSTM (or any models) on one labelled split, side by side.

Every model scores the same images, so the comparisons are paired: McNemar on the calls at
each model's stored threshold, DeLong and a patient-level paired bootstrap on AUROC. Every
number comes from `lungray.metrics`; this module only decides what is measured on which
cases, times inference, and writes the report folder:

    report.md, report.html   the report (the HTML is self-contained: images inline)
    metrics.json             every number of the report, machine-readable
    predictions.parquet      one row per (model, image): the scores the numbers come from
    figures/                 ROC, PR, confusion matrices, reliability, training curves, Grad-CAM

The folder is written under a temporary name beside `--output` and renamed into place,
so a failed run never leaves half a report.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lungray.evaluate import SCORING_BATCH_SIZE, check_preprocessing, labelled_split
from lungray.ingest import load_summary
from lungray.metrics import (
    binary_metrics,
    bootstrap_ci,
    calibration_curve_data,
    delong_test,
    mcnemar,
    metrics_with_ci,
    paired_bootstrap_auroc,
    predict_labels,
    sensitivity_at_specificity,
    specificity_at_sensitivity,
)
from lungray.modeldir import ModelDir, load_model_dir
from lungray.models import count_parameters
from lungray.preprocess import to_float
from lungray.report import plots
from lungray.report.gradcam import gradcam, overlay_png
from lungray.report.render import across_markdown, write_report
from lungray.site.lineage import fitted_on, images_fitted_on
from lungray.split import SPLITS, patient_array

ALPHA = 0.05  # 95% intervals
SPECIFICITY_FLOORS = (0.80, 0.90)  # sensitivity reached at these specificities
SENSITIVITY_FLOORS = (0.90, 0.95)  # specificity reached at these sensitivities
ARCH_NAMES = {"cnn": "CNN", "cnn_lstm": "CNN-LSTM", "ensemble": "Ensemble"}
#: The design's published results. Accuracy is the only figure it reports for either
#: model; its split, threshold and other metrics are not known.
PUBLISHED_ACCURACY = {"cnn": 0.925, "cnn_lstm": 0.941}
CASE_COLUMNS = ("image", "label", "patient_key", "source", "path", "content_hash")


@dataclass(frozen=True)
class CompareConfig:
    """What to compare, on which data, and how hard to resample."""

    model_dirs: tuple[str, ...]
    data: str
    output: str
    split: str = "test"
    n_boot: int = 1000
    seed: int = 0
    gradcam_examples: int = 3  # per kind (true positive, false positive, false negative) and model
    batch_size: int = 64  # inference batch for the timed scoring pass
    device: str = "cpu"  # where the models score and are timed, e.g. "cuda"

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dirs", tuple(self.model_dirs))
        if not self.model_dirs:
            raise ValueError("compare needs at least one model directory")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.n_boot < 1:
            raise ValueError(f"n_boot must be at least 1, got {self.n_boot}")
        if self.gradcam_examples < 0:
            raise ValueError(f"gradcam_examples must be 0 or more, got {self.gradcam_examples}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class Cases:
    """The labelled images of one split, in path order, with what the statistics group by."""

    images: np.ndarray  # (N, size, size), the stored dtype
    labels: np.ndarray  # int64 0/1
    patients: np.ndarray  # patient_key; an image without one is its own patient
    sources: np.ndarray
    paths: np.ndarray
    content_hashes: np.ndarray


def run_compare(config: CompareConfig) -> dict[str, Any]:
    """Score every model on the split, compare them, and write the report folder; returns metrics.json."""
    output = report_folder(config.output)
    summary = load_summary(config.data)
    models = load_models(config.model_dirs, config.data, summary, config.device)
    cases = read_cases(config.data, config.split)
    names = display_names(models)
    scored = [timed_scores(model, cases.images, config.batch_size) for model in models]
    probs = {model.model_id: prob for model, (prob, _) in zip(models, scored)}

    results: dict[str, Any] = {
        "data": describe_cases(cases, config, summary),
        "ci": {
            "method": "percentile bootstrap, resampling patients (patient_key) with all their images",
            "level": 1 - ALPHA,
            "resamples": config.n_boot,
            "seed": config.seed,
        },
        "models": [
            model_results(model, name, cases, probs[model.model_id], images_per_s, summary, config)
            for model, name, (_, images_per_s) in zip(models, names, scored)
        ],
        "pairs": [pair_results(a, b, cases, probs, config) for a, b in itertools.combinations(models, 2)],
        "by_source": source_results(models, cases, probs, config),
        "published": {
            "accuracy": PUBLISHED_ACCURACY,
            "note": "The design reports accuracy only; its split, threshold and other metrics are not known.",
        },
    }
    with staged(output) as staging:
        results["figures"] = write_figures(staging, results, cases, probs)
        for model, entry in zip(models, results["models"]):
            entry["gradcam"] = write_gradcam_examples(staging, model, cases, probs[model.model_id], config.gradcam_examples)
        write_predictions(staging / "predictions.parquet", models, cases, probs)
        results = json_ready(results)
        write_report(results, staging)
        (staging / "metrics.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    return results


def data_set_name(data: str, index: int) -> str:
    """The report folder of one data set: its folder's name (`.` and `..` resolved), else `data<index>`."""
    name = Path(data.rstrip("/")).name if "://" in data else Path(data).resolve().name
    return name if name not in ("", ".", "..") else f"data{index}"


def run_compare_across(config: CompareConfig, datas: Sequence[str]) -> dict[str, Any]:
    """The same models on several data sets (e.g. home and a site): one report per data set, and a summary.

    `OUTPUT/<data folder name>/` holds each data set's full report; `OUTPUT/summary.json`
    and `summary.md` set every model's AUROC and its calls at the stored threshold side by
    side across the data sets, with their CIs and the lineage's in-sample warning. The
    whole folder is staged and renamed into place like a single report.
    """
    output = report_folder(config.output)
    names = [data_set_name(data, index) for index, data in enumerate(datas)]
    names = [name if names.count(name) == 1 else f"{index}-{name}" for index, name in enumerate(names)]
    with staged(output) as staging:
        reports = {name: run_compare(replace(config, data=data, output=str(staging / name))) for name, data in zip(names, datas)}
        summary = {
            "data_sets": {name: report["data"] for name, report in reports.items()},
            "rows": [
                {
                    "data_set": name,
                    "model_id": model["model_id"],
                    "name": model["name"],
                    "threshold": model["threshold"],
                    **{key: model["metrics"][key] for key in ("auroc", "recall", "specificity")},
                    "fitted_on_this_data": any(step["fitted_on_this_data"] for step in model["lineage"]),
                }
                for name, report in reports.items()
                for model in report["models"]
            ],
        }
        (staging / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        (staging / "summary.md").write_text(across_markdown(summary))
    return summary


def load_models(model_dirs: Sequence[str], data: str, summary: dict[str, Any], device: str) -> list[ModelDir]:
    """The model directories, refusing any whose preprocessing differs from the data's.

    A model scored on differently preprocessed images would be measured on inputs it never
    saw, and the same model given twice would compare it with itself.
    """
    models = [load_model_dir(path, device=device) for path in model_dirs]
    for model in models:
        check_preprocessing(model, summary, data)
    ids = [model.model_id for model in models]
    repeated = sorted({model_id for model_id in ids if ids.count(model_id) > 1})
    if repeated:
        raise ValueError(f"the same model was given more than once: {repeated}")
    return models


def read_cases(data: str, split: str) -> Cases:
    """Every labelled image of `split`, sorted by path so that reports are reproducible.

    The whole split is held in memory (50 KB per 224 px uint8 image): every model scores
    the same array, and the Grad-CAM examples are picked from it afterwards.
    """
    columns: dict[str, list[np.ndarray]] = {name: [] for name in CASE_COLUMNS}
    for batch in labelled_split(data, split, columns=CASE_COLUMNS).iter_batches(
        batch_size=SCORING_BATCH_SIZE, batch_format="numpy"
    ):
        for name in CASE_COLUMNS:
            columns[name].append(batch[name])
    if not columns["label"]:
        raise ValueError(f"the {split} split of {data} has no labelled images")
    merged = {name: np.concatenate(parts) for name, parts in columns.items()}
    order = np.argsort(merged["path"], kind="stable")
    paths = merged["path"][order].astype(str)
    patients = patient_array(merged["patient_key"][order], paths)
    labels = merged["label"][order].astype(np.int64)
    n_positive = int(labels.sum())
    if min(n_positive, labels.size - n_positive) < 2:
        raise ValueError(
            f"the {split} split of {data} has {n_positive} abnormal and {labels.size - n_positive} normal images; "
            "comparing models needs at least 2 of each"
        )
    return Cases(merged["image"][order], labels, patients, merged["source"][order].astype(str), paths, merged["content_hash"][order].astype(str))


def display_names(models: Sequence[ModelDir]) -> list[str]:
    """"CNN", "CNN-LSTM", "Ensemble", with each site step ("CNN + calibrate B"); the model id is added
    where two models would still share a name."""
    bases = [
        " + ".join([ARCH_NAMES[model.meta["architecture"]["arch"]], *(f"{step['step']} {step.get('site')}" for step in model.meta.get("lineage", []))])
        for model in models
    ]
    return [base if bases.count(base) == 1 else f"{base} {model.model_id}" for base, model in zip(bases, models)]


def timed_scores(model: ModelDir, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, float]:
    """Probabilities of every image and the images/s of `predict_proba` on this machine.

    One batch is scored first and not timed: the first call pays for allocation and kernel
    selection, which a long-running screening job pays once.
    """
    model.predict_proba(images[:batch_size], batch_size=batch_size)
    started = time.perf_counter()
    prob = model.predict_proba(images, batch_size=batch_size)
    return prob, len(images) / (time.perf_counter() - started)


def describe_cases(cases: Cases, config: CompareConfig, summary: dict[str, Any]) -> dict[str, Any]:
    sources, counts = np.unique(cases.sources, return_counts=True)
    return {
        "path": config.data,
        "fingerprint": summary["fingerprint"],
        "split": config.split,
        "n_images": int(cases.labels.size),
        "n_patients": int(np.unique(cases.patients).size),
        "n_abnormal": int(cases.labels.sum()),
        "n_normal": int(cases.labels.size - cases.labels.sum()),
        "images_by_source": {str(source): int(count) for source, count in zip(sources, counts)},
    }


def model_results(
    model: ModelDir,
    name: str,
    cases: Cases,
    prob: np.ndarray,
    images_per_s: float,
    summary: dict[str, Any],
    config: CompareConfig,
) -> dict[str, Any]:
    """One model's metrics with CIs, operating points, calibration, efficiency and training record."""
    meta = model.meta
    resampling = {"groups": cases.patients, "n_boot": config.n_boot, "alpha": ALPHA, "seed": config.seed}
    return {
        "model_id": model.model_id,
        "name": name,
        "arch": meta["architecture"]["arch"],
        "model_dir": str(model.path),
        "threshold": model.threshold,
        "threshold_policy": meta.get("threshold_policy"),
        "confusion_matrix": binary_metrics(cases.labels, prob, model.threshold)["confusion_matrix"],
        "metrics": metrics_with_ci(cases.labels, prob, model.threshold, **resampling),
        "operating_points": operating_points(cases.labels, prob, resampling),
        "calibration": calibration_curve_data(cases.labels, prob),
        "efficiency": {
            "n_parameters": count_parameters(model.model),
            "training_wall_time_s": meta.get("wall_time_s"),
            "training_hardware": meta.get("hardware") or None,
            "epochs_trained": meta.get("epochs_trained"),
            "best_epoch": meta.get("best_epoch"),
            "selected_epoch": meta.get("selected_epoch", meta.get("best_epoch")),  # older lungray exported the best
            "peak_training_memory_mb": meta.get("peak_memory_mb"),
            "inference_images_per_s": images_per_s,
            "inference_device": str(next(model.model.parameters()).device),
            "inference_torch_threads": torch.get_num_threads(),
            "inference_batch_size": config.batch_size,
        },
        "training_sources": training_sources(meta, summary),
        "lineage": lineage_summary(meta, summary, cases.content_hashes),
        "history": meta.get("history", []),
    }


def lineage_summary(meta: dict[str, Any], summary: dict[str, Any], content_hashes: np.ndarray) -> list[dict[str, Any]]:
    """The site steps a model was derived by (`lungray calibrate` / `adapt`), oldest first.

    `fitted_on_this_data` marks a step that saw images of this report (`images_fitted_on` of
    them, by content: another ingest of the same films, with other splits or from another
    folder, counts too): its threshold, temperature or weights were chosen on them, so the
    figures here are in-sample for it; the step's own cross-validated figures (model.json)
    are the honest ones. A step recorded before `film_keys` is matched by the ingest's fingerprint.
    """
    return [
        {
            "step": step["step"],
            "site": step.get("site"),
            "parent_model_id": step.get("parent_model_id"),
            "n_images": step.get("n_images"),
            "labels_used": step.get("labels_used"),
            "fitted_on_this_data": fitted_on(step, content_hashes, summary["fingerprint"]),
            "images_fitted_on": images_fitted_on(step, content_hashes),
            "cross_validation": _cv_rates(step.get("cross_validation")),
            "warnings": list(step.get("warnings") or []),  # what the step said when fitted (a sample too small, ...)
        }
        for step in meta.get("lineage", [])
    ]


def _cv_rates(cross_validation: dict[str, Any] | None) -> dict[str, Any] | None:
    """The pooled held-out sensitivity and specificity a calibrating step recorded, with their CIs."""
    if not cross_validation:
        return None
    return {"folds": cross_validation["folds"], "recall": cross_validation["recall"], "specificity": cross_validation["specificity"]}


def operating_points(labels: np.ndarray, prob: np.ndarray, resampling: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Sensitivity at fixed specificities and specificity at fixed sensitivities, with CIs.

    These do not depend on the stored threshold: they say what each model could do at the
    operating point a screening programme might choose.
    """
    targets: list[tuple[str, Callable[[np.ndarray, np.ndarray], float]]] = [
        (f"sensitivity_at_specificity_{floor:.2f}", partial(sensitivity_at_specificity, specificity=floor))
        for floor in SPECIFICITY_FLOORS
    ] + [
        (f"specificity_at_sensitivity_{floor:.2f}", partial(specificity_at_sensitivity, sensitivity=floor))
        for floor in SENSITIVITY_FLOORS
    ]
    points = {}
    for key, metric in targets:
        value, low, high = bootstrap_ci(labels, prob, metric, **resampling)
        points[key] = {"value": value, "ci_low": low, "ci_high": high}
    return points


def training_sources(meta: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """Which sources a model was trained on, and how we know; `sources` is None when we do not.

    model.json's `training_sources`, when export records them, are taken as written. A model
    whose data fingerprint is this ingest's was trained on its train split, which holds
    every labelled source of the ingest. Otherwise the fingerprint names data that this
    report cannot see, so no source is guessed.
    """
    if meta.get("training_sources"):
        return {"sources": sorted(meta["training_sources"]), "basis": "training_sources in model.json"}
    fingerprint = meta.get("data_fingerprint")
    if fingerprint == summary["fingerprint"]:
        sources = sorted({spec["dataset"] for spec in summary["sources"] if spec.get("dataset")})
        return {"sources": sources, "basis": "trained on this ingest's train split (same data fingerprint)"}
    if fingerprint is None:
        return {"sources": None, "basis": "model.json records neither training sources nor a data fingerprint"}
    return {
        "sources": None,
        "basis": f"model.json names no training sources, and its data fingerprint {fingerprint[:12]} is not this ingest's",
    }


def pair_results(a: ModelDir, b: ModelDir, cases: Cases, probs: dict[str, np.ndarray], config: CompareConfig) -> dict[str, Any]:
    """McNemar on the threshold calls, DeLong and the patient-level paired bootstrap on AUROC (a - b)."""
    prob_a, prob_b = probs[a.model_id], probs[b.model_id]
    return {
        "model_a": a.model_id,
        "model_b": b.model_id,
        "mcnemar": mcnemar(cases.labels, predict_labels(prob_a, a.threshold), predict_labels(prob_b, b.threshold)),
        "delong": delong_test(cases.labels, prob_a, prob_b, alpha=ALPHA),
        "paired_bootstrap_auroc": paired_bootstrap_auroc(
            cases.labels, prob_a, prob_b, groups=cases.patients, n_boot=config.n_boot, alpha=ALPHA, seed=config.seed
        ),
    }


def source_results(
    models: Sequence[ModelDir], cases: Cases, probs: dict[str, np.ndarray], config: CompareConfig
) -> dict[str, Any]:
    """Per-source metrics of every model, when the split merges two or more sources (else empty)."""
    sources = sorted(set(cases.sources.tolist()))
    if len(sources) < 2:
        return {}
    breakdown = {}
    for source in sources:
        mask = cases.sources == source
        labels = cases.labels[mask]
        breakdown[source] = {
            "n_images": int(mask.sum()),
            "n_patients": int(np.unique(cases.patients[mask]).size),
            "n_abnormal": int(labels.sum()),
            "metrics": {
                model.model_id: metrics_with_ci(
                    labels, probs[model.model_id][mask], model.threshold,
                    groups=cases.patients[mask], n_boot=config.n_boot, alpha=ALPHA, seed=config.seed,
                )
                for model in models
            },
        }
    return breakdown


def write_figures(directory: Path, results: dict[str, Any], cases: Cases, probs: dict[str, np.ndarray]) -> dict[str, str]:
    """The report's plots as PNG files; returns their paths relative to `directory`."""
    models = results["models"]
    by_name = {entry["name"]: probs[entry["model_id"]] for entry in models}
    figures = {
        "roc": plots.roc_figure(cases.labels, by_name),
        "pr": plots.pr_figure(cases.labels, by_name),
        "confusion": plots.confusion_figure({entry["name"]: entry["confusion_matrix"] for entry in models}),
        "reliability": plots.reliability_figure({entry["name"]: entry["calibration"] for entry in models}),
    }
    histories = {entry["name"]: entry["history"] for entry in models if entry["history"]}
    if histories:
        figures["training"] = plots.training_figure(histories)
    written = {}
    for key, figure in figures.items():
        relative = f"figures/{key}.png"
        _created(directory / "figures")
        (directory / relative).write_bytes(plots.png_bytes(figure))
        written[key] = relative
    return written


def write_gradcam_examples(
    directory: Path, model: ModelDir, cases: Cases, prob: np.ndarray, per_kind: int
) -> dict[str, list[dict[str, Any]]]:
    """Grad-CAM overlays of the model's most confident true and false positives and its surest misses.

    "Most confident" puts the clearest successes and the errors a reader most needs to
    see first: false positives with the highest scores, false negatives with the lowest.
    Returns the examples by kind (a kind with no case in the split has none); no kinds at all
    when none were asked for, so the report does not read as if the split had no such case.
    """
    if per_kind == 0:
        return {}
    positive, called = cases.labels == 1, predict_labels(prob, model.threshold) == 1
    highest_first = np.argsort(-prob, kind="stable")
    chosen = {
        "true positive": [i for i in highest_first if positive[i] and called[i]][:per_kind],
        "false positive": [i for i in highest_first if not positive[i] and called[i]][:per_kind],
        "false negative": [i for i in highest_first[::-1] if positive[i] and not called[i]][:per_kind],
    }
    folder = Path("figures") / "gradcam" / model.model_id
    examples: dict[str, list[dict[str, Any]]] = {}
    for kind, indices in chosen.items():
        examples[kind] = []
        for rank, index in enumerate(indices, start=1):
            image = to_float(cases.images[index])
            heat = gradcam(model.model, torch.from_numpy(image)[None, None])
            relative = folder / f"{kind.replace(' ', '-')}-{rank}.png"
            _created(directory / folder)
            (directory / relative).write_bytes(overlay_png(np.rint(image * 255).astype(np.uint8), heat))
            # The film is named by its content hash (as in the ingest's rows and predictions.parquet),
            # not its path: metrics.json is the file a report is shared as, and paths carry names.
            examples[kind].append({"prob": float(prob[index]), "content_hash": str(cases.content_hashes[index]), "file": relative.as_posix()})
    return examples


def write_predictions(path: Path, models: Sequence[ModelDir], cases: Cases, probs: dict[str, np.ndarray]) -> None:
    """One row per (model, image): the scores every number of the report is computed from."""
    n = cases.labels.size
    table = pa.table(
        {
            "model_id": np.repeat([model.model_id for model in models], n),
            "path": np.tile(cases.paths, len(models)),
            "source": np.tile(cases.sources, len(models)),
            "patient_key": np.tile(cases.patients.astype(str), len(models)),
            "label": np.tile(cases.labels, len(models)),
            "prob": np.concatenate([probs[model.model_id] for model in models]),
            "call": np.concatenate([predict_labels(probs[model.model_id], model.threshold) for model in models]),
        }
    )
    pq.write_table(table, path)


def json_ready(value: Any) -> Any:
    """`value` with NaN and infinities as null, so metrics.json is strict JSON."""
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def report_folder(output: str) -> Path:
    """The report's folder, absolute, checked before any scoring: new or empty, and not the
    working directory or one above it, which the rename into place would take from under the
    shell that ran the command (it would then list an empty folder)."""
    folder = Path(output).resolve()
    if folder == Path.cwd() or folder in Path.cwd().parents:
        raise ValueError(f"{output} is the working directory or holds it; give the report a folder of its own (e.g. {output.rstrip('/')}/report)")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{folder} is {'not empty' if folder.is_dir() else 'a file'}; choose another output")
    return folder


@contextmanager
def staged(output: Path) -> Iterator[Path]:
    """An empty folder beside `output` to write the report in, renamed to `output` when the
    block ends whole and removed when it raises, so a reader never sees half a report. Made by
    a plain mkdir, so the report is as readable as the folders around it (mkdtemp's are 0700)."""
    staging = _created(output.parent) / f".{output.name}-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        yield staging
        if output.exists():
            output.rmdir()  # empty, checked by report_folder; rename needs the name free
        os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _created(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory
