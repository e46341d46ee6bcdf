"""`lungray` command line: argument parsing only; the library does the work."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ray.exceptions import RayError

from lungray.ensemble import build_ensemble_dir, summarize
from lungray.evaluate import evaluate
from lungray.ingest import IngestConfig, SourceSpec, run_ingest
from lungray.io.decode import DecodeOptions
from lungray.io.scope import CHECKED_FIELDS, Scope
from lungray.preprocess import ASPECT_POLICIES, INTENSITY_POLICIES, PreprocessConfig
from lungray.progress import PROGRESS_LOGGER
from lungray.raysession import init_ray, quiet_ray
from lungray.models.ensemble import TTA_VIEWS
from lungray.report.compare import CompareConfig, json_ready, run_compare, run_compare_across
from lungray.pacs.dicomweb import DEFAULT_MODALITIES
from lungray.pacs.source import PacsError
from lungray.screen.lease import ConcurrentRunError
from lungray.screen.pipeline import ScreenConfig, run_screen
from lungray.screen.tables import AGGREGATES
from lungray.screen.writeback import REPORT_CHOICES
from lungray.site.adapt import AdaptConfig, adapt
from lungray.site.calibrate import CalibrateConfig, calibrate
from lungray.site.invariance import measure_invariance
from lungray.sources import DATASETS
from lungray.split import SPLITS
from lungray.models import ARCHITECTURES
from lungray.train.augment import AugmentConfig
from lungray.train.loop import SCHEDULES, SELECTIONS
from lungray.train.trainer import TrainConfig, run_training
from lungray.tune import METRIC_MODES, SCHEDULERS, SweepConfig, load_space, run_tune


def strict_json(value: object) -> str:
    """`value` as indented strict JSON, NaN (an AUROC of a one-class split) as null: what jq
    and other strict parsers read."""
    return json.dumps(json_ready(value), indent=2, allow_nan=False)


def parse_fractions(text: str) -> tuple[float, float, float]:
    parts = [float(part) for part in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("--split takes three fractions: train,val,test (e.g. 0.7,0.15,0.15)")
    return parts[0], parts[1], parts[2]


def parse_extra_source(text: str) -> SourceSpec:
    dataset, sep, uri = text.partition("=")
    if not sep or dataset not in DATASETS or not uri:
        raise argparse.ArgumentTypeError(f"--also takes DATASET=URI with DATASET one of {DATASETS}, got {text!r}")
    return SourceSpec(uri=uri, dataset=dataset)


def scope_setting(text: str) -> str:
    try:
        Scope.from_settings([text])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_min_sensitivity_argument(parser: argparse.ArgumentParser) -> None:
    """`--min-sensitivity`: the threshold rule of every command that exports a model directory."""
    parser.add_argument(
        "--min-sensitivity", type=float, default=TrainConfig.min_sensitivity,
        help="the threshold is the most specific one reaching this sensitivity on validation",
    )


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The `lungray train` / jobs/train.py arguments."""
    parser.add_argument("--model", choices=ARCHITECTURES, required=True)
    parser.add_argument("--data", required=True, help="ingested dataset folder (or s3:// prefix)")
    parser.add_argument("--output", required=True, help="model directory to write; rerun to resume")
    parser.add_argument("--workers", type=int, default=TrainConfig.workers, help="data-parallel training workers")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16 autocast")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="per worker")
    parser.add_argument("--lr", type=float, default=TrainConfig.lr, help="AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay, help="AdamW weight decay")
    parser.add_argument("--label-smoothing", type=float, default=TrainConfig.label_smoothing, help="of the training loss")
    parser.add_argument(
        "--ema-decay", type=float, default=TrainConfig.ema_decay,
        help="validate and export an exponential moving average of the weights (0: the raw weights)",
    )
    parser.add_argument(
        "--mixup-alpha", type=float, default=TrainConfig.mixup_alpha,
        help="MixUp training batches with lambda ~ Beta(alpha, alpha) (0: off)",
    )
    parser.add_argument("--schedule", choices=SCHEDULES, default=TrainConfig.schedule, help="learning-rate schedule")
    parser.add_argument(
        "--select", choices=SELECTIONS, default=TrainConfig.select,
        help="export the last epoch's weights or those of the best val AUROC; a finished run re-exports with another",
    )
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--patience", type=int, default=TrainConfig.patience, help="epochs without a better val AUROC before stopping")
    add_min_sensitivity_argument(parser)
    parser.add_argument("--no-augment", action="store_true", help="train without augmentation")
    parser.add_argument("--size", type=int, default=None, help="fail unless the data was ingested at this size")
    parser.add_argument("--max-failures", type=int, default=TrainConfig.max_failures, help="worker failures to recover from")
    parser.add_argument("--cpus-per-worker", type=float, default=None)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        model=args.model,
        data=args.data,
        output=args.output,
        workers=args.workers,
        use_gpu=args.gpu,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        ema_decay=args.ema_decay,
        mixup_alpha=args.mixup_alpha,
        schedule=args.schedule,
        select=args.select,
        seed=args.seed,
        patience=args.patience,
        min_sensitivity=args.min_sensitivity,
        augment=AugmentConfig(enabled=not args.no_augment),
        size=args.size,
        max_failures=args.max_failures,
        cpus_per_worker=args.cpus_per_worker,
    )


def add_scope_and_privacy_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags ingest and screen share: which objects are in scope, and how identifiers are keyed."""
    defaults = "; ".join(f"{key}={','.join(getattr(Scope(), key))}" for key in CHECKED_FIELDS)
    parser.add_argument(
        "--scope", type=scope_setting, action="append", default=[], metavar="KEY=VALUES",
        help=f"accepted DICOM header values, KEY one of {', '.join(CHECKED_FIELDS)}, VALUES comma-separated or 'any' "
        f"(repeatable; others become status=skipped rows; absent values and PNG/JPEG are in scope). Default: {defaults}",
    )
    parser.add_argument(
        "--pseudonymize", action="store_true",
        help="replace paths, study ids, UIDs and mtimes by keyed values and dates by their year (outputs that leave the site)",
    )
    parser.add_argument(
        "--throwaway-salt", action="store_true",
        help="allow a run without LUNGRAY_PATIENT_SALT, keying with a random salt for this run only (demo and throwaway data); where it is set, it is used",
    )


def add_ingest_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="local folder or s3://bucket/prefix, listed recursively")
    parser.add_argument("output", help="output folder or s3:// prefix for the Parquet dataset")
    parser.add_argument("--dataset", choices=DATASETS, default=None, help="how to label INPUT (default: unlabelled)")
    parser.add_argument("--labels", default=None, help="labels CSV for --dataset csv / chestxray14")
    parser.add_argument(
        "--also", type=parse_extra_source, action="append", default=[], metavar="DATASET=URI",
        help="merge another labelled source (repeatable); its labels CSV is looked up inside URI",
    )
    parser.add_argument("--size", type=int, default=PreprocessConfig.size, help="output side in pixels")
    parser.add_argument("--aspect", choices=ASPECT_POLICIES, default=PreprocessConfig.aspect)
    parser.add_argument("--intensity", choices=INTENSITY_POLICIES, default=PreprocessConfig.intensity)
    parser.add_argument("--dtype", choices=("uint8", "uint16"), default=PreprocessConfig.dtype)
    parser.add_argument("--no-voi", action="store_true", help="ignore DICOM VOI LUT / window (use the full modality range)")
    parser.add_argument("--max-pixels", type=int, default=DecodeOptions.max_pixels, help="decompression bomb limit")
    parser.add_argument("--split", type=parse_fractions, default=(0.7, 0.15, 0.15), help="train,val,test fractions")
    parser.add_argument("--seed", type=int, default=0, help="split seed")
    parser.add_argument(
        "--holdout", action="append", default=[], metavar="GLOB",
        help="hold out whole cohorts as the test split: files whose relative path matches (repeatable)",
    )
    parser.add_argument("--shard-rows", type=int, default=IngestConfig.shard_rows, help="rows per Parquet shard")
    add_scope_and_privacy_arguments(parser)


def ingest_config_from_args(args: argparse.Namespace) -> IngestConfig:
    return IngestConfig(
        sources=(SourceSpec(uri=args.input, dataset=args.dataset, labels=args.labels), *args.also),
        output=args.output,
        preprocess=PreprocessConfig(size=args.size, aspect=args.aspect, intensity=args.intensity, dtype=args.dtype),
        decode=DecodeOptions(apply_voi=not args.no_voi, max_pixels=args.max_pixels),
        fractions=args.split,
        seed=args.seed,
        holdout=tuple(args.holdout),
        shard_rows=args.shard_rows,
        scope=Scope.from_settings(args.scope),
        pseudonymize=args.pseudonymize,
        throwaway_salt=args.throwaway_salt,
    )


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """The `lungray evaluate` / jobs/evaluate.py arguments."""
    parser.add_argument("model_dir", help="model directory written by `lungray train`")
    parser.add_argument("data", help="ingested dataset folder (or s3:// prefix)")
    parser.add_argument("--split", choices=SPLITS, default="test", help="split to score (default: test)")


def add_ensemble_arguments(parser: argparse.ArgumentParser) -> None:
    """The `lungray ensemble` arguments."""
    parser.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR", help="trained model directories (e.g. a CNN and a CNN-LSTM)")
    parser.add_argument("--data", required=True, help="the ingest the members were trained on; its val split sets the threshold")
    parser.add_argument("--output", required=True, help="model directory to write")
    parser.add_argument("--tta", choices=tuple(TTA_VIEWS), default="none", help="test-time views averaged with the members")
    add_min_sensitivity_argument(parser)


def ensemble_from_args(args: argparse.Namespace) -> Path:
    return build_ensemble_dir(args.model_dirs, args.data, args.output, args.tta, args.min_sensitivity)


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """The `lungray compare` / jobs/compare.py arguments."""
    parser.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR", help="model directories written by `lungray train`")
    parser.add_argument(
        "--data", required=True, action="append",
        help="ingested dataset folder (or s3:// prefix); repeat it (e.g. home and a site) for one report per data set and a summary",
    )
    parser.add_argument("--split", choices=SPLITS, default=CompareConfig.split, help="split to score (default: test)")
    parser.add_argument("--output", required=True, help="report folder to create (local; must not exist or be empty)")
    parser.add_argument("--n-boot", type=int, default=CompareConfig.n_boot, help="bootstrap resamples for every CI and test")
    parser.add_argument("--seed", type=int, default=CompareConfig.seed, help="bootstrap seed")
    parser.add_argument(
        "--gradcam-examples", type=int, default=CompareConfig.gradcam_examples,
        help="Grad-CAM overlays per model of each of true positives, false positives, false negatives",
    )
    parser.add_argument("--batch-size", type=int, default=CompareConfig.batch_size, help="inference batch for the timed pass")
    parser.add_argument("--device", default=CompareConfig.device, help="torch device to score and time on (default: cpu)")


def compare_config_from_args(args: argparse.Namespace) -> CompareConfig:
    return CompareConfig(
        model_dirs=tuple(args.model_dirs), data=args.data[0], output=args.output, split=args.split,
        n_boot=args.n_boot, seed=args.seed, gradcam_examples=args.gradcam_examples, batch_size=args.batch_size,
        device=args.device,
    )


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """The `lungray tune` / jobs/tune.py arguments."""
    parser.add_argument("--space", required=True, help="search-space YAML (see tune_spaces/README.md)")
    parser.add_argument("--data", required=True, help="ingested dataset folder (or s3:// prefix)")
    parser.add_argument("--samples", type=int, required=True, help="trials to sample (times the grid size, if any)")
    parser.add_argument("--output", required=True, help="folder for results, best/ and tune.png; rerun to resume")
    parser.add_argument("--storage", default=None, help="where Tune keeps the sweep and checkpoints (folder or s3://); default OUTPUT/_ray")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default=SweepConfig.scheduler, help="asha stops trailing trials early")
    parser.add_argument("--metric", choices=tuple(METRIC_MODES), default=SweepConfig.metric, help="ranks trials")
    parser.add_argument("--grace-period", type=int, default=SweepConfig.grace_period, help="epochs before ASHA may stop a trial")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: the space file's)")
    parser.add_argument("--workers", type=int, default=SweepConfig.workers, help="data-parallel workers per trial")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--cpus-per-worker", type=float, default=None, help="default: a whole CPU, or the cluster's share for --max-concurrent trials")
    parser.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default and cap: what the cluster fits)")
    parser.add_argument("--seed", type=int, default=SweepConfig.seed)
    parser.add_argument("--min-sensitivity", type=float, default=SweepConfig.min_sensitivity, help="threshold rule of the exported model")


def tune_config_from_args(args: argparse.Namespace) -> SweepConfig:
    return SweepConfig(
        space=load_space(args.space), data=args.data, output=args.output, samples=args.samples, storage=args.storage,
        scheduler=args.scheduler, metric=args.metric, grace_period=args.grace_period, epochs=args.epochs,
        workers=args.workers, use_gpu=args.gpu, cpus_per_worker=args.cpus_per_worker,
        max_concurrent=args.max_concurrent, seed=args.seed, min_sensitivity=args.min_sensitivity, console=getattr(args, "verbose", False),
    )


def cmd_ingest(args: argparse.Namespace) -> int:
    config = ingest_config_from_args(args)
    init_ray()
    summary = run_ingest(config)
    print(strict_json({key: summary[key] for key in ("files", "by_status", "by_label", "splits", "images_per_second")}))
    return 0


def add_screen_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (local or s3://)")
    parser.add_argument(
        "--input", required=True,
        help="archive: local folder or s3://bucket/prefix, recursive; or a PACS: dicomweb+http(s)://HOST[:PORT]/PATH "
        "(credentials from LUNGRAY_DICOMWEB_TOKEN or LUNGRAY_DICOMWEB_USER/PASSWORD; see docs/operators.md)",
    )
    parser.add_argument("--output", required=True, help="output root: images/, studies/, runs/")
    parser.add_argument("--date", default=None, help="scored_date partition, YYYY-MM-DD (default: today, UTC)")
    parser.add_argument(
        "--incremental", action="store_true",
        help="skip files this model already scored (same path, size, mtime; a PACS instance: same SOP Instance UID)",
    )
    parser.add_argument("--since", default=None, metavar="YYYY-MM-DD", help="PACS input: studies dated on or after (StudyDate)")
    parser.add_argument("--until", default=None, metavar="YYYY-MM-DD", help="PACS input: studies dated on or before (StudyDate)")
    parser.add_argument(
        "--modality", action="append", default=None, metavar="MODALITY",
        help=f"PACS input: modality to query, repeatable (default: {' and '.join(DEFAULT_MODALITIES)})",
    )
    parser.add_argument(
        "--max-retries", type=int, default=ScreenConfig.max_retries, metavar="N",
        help="--incremental scores a file whose last row is an error again on later runs, up to N tries in all (the row's `tries`); "
        "a --report-to store the PACS refused is tried again by as many runs",
    )
    parser.add_argument(
        "--chunk-files", type=int, default=ScreenConfig.chunk_files, metavar="N",
        help="commit the image rows in chunks of at most N files (one Ray Data execution each): a killed run loses at most one chunk",
    )
    parser.add_argument(
        "--chunk-minutes", type=float, default=ScreenConfig.chunk_minutes, metavar="M",
        help="also commit whenever M minutes have passed since the last commit",
    )
    parser.add_argument("--aggregate", choices=AGGREGATES, default="max", help="study probability from its images")
    parser.add_argument("--batch-size", type=int, default=None, help="inference batch (default: 32 on CPU, 512 on GPU)")
    parser.add_argument("--actors", type=int, default=None, help="model actors (default: one per GPU, or one per two CPUs)")
    parser.add_argument(
        "--gpu", action="store_true",
        help="score on GPU actors even when no GPU node is up yet (the autoscaler starts them); default: GPUs if present",
    )
    parser.add_argument("--max-pixels", type=int, default=DecodeOptions.max_pixels, help="decompression bomb limit")
    parser.add_argument("--explain", action="store_true", help="a Grad-CAM overlay PNG for each flagged study (explain/)")
    parser.add_argument(
        "--report-to", default=None, metavar="dicomweb+http(s)://...",
        help="after the run is committed, store a DICOM SR (TID 1500) into each reported study of this DICOMweb service",
    )
    parser.add_argument("--report", choices=REPORT_CHOICES, default="flagged", help="which studies get an SR (with --report-to)")
    parser.add_argument(
        "--report-overlay", action="store_true",
        help="with --report-to: also each flagged study's Grad-CAM overlay, as a Secondary Capture marked not for diagnosis",
    )
    add_scope_and_privacy_arguments(parser)


def screen_config_from_args(args: argparse.Namespace) -> ScreenConfig:
    optional = {"date": args.date} if args.date else {}
    return ScreenConfig(
        model=args.model, input=args.input, output=args.output, incremental=args.incremental,
        aggregate=args.aggregate, explain=args.explain, batch_size=args.batch_size, actors=args.actors, gpu=args.gpu,
        max_pixels=args.max_pixels, scope=Scope.from_settings(args.scope),
        pseudonymize=args.pseudonymize, throwaway_salt=args.throwaway_salt, since=args.since, until=args.until,
        modalities=tuple(args.modality or DEFAULT_MODALITIES), report_to=args.report_to, report=args.report,
        report_overlay=args.report_overlay, max_retries=args.max_retries, chunk_files=args.chunk_files,
        chunk_minutes=args.chunk_minutes, **optional,
    )


def cmd_screen(args: argparse.Namespace) -> int:
    config = screen_config_from_args(args)
    init_ray(progress_bars=args.verbose)
    try:
        summary = run_screen(config)
    except PacsError as exc:  # the PACS cannot be queried (refused connection, bad credential): nothing was run
        print(f"lungray screen: error: {exc}", file=sys.stderr)
        return 2
    except ConcurrentRunError as exc:
        print(f"lungray screen: error: {exc}", file=sys.stderr)
        return 3
    keys = ("run_id", "files_listed", "files_scored", "by_status", "studies_flagged", "images_per_second", "reports")
    print(strict_json({key: summary[key] for key in keys}))
    print(f"predictions: Delta tables {args.output}/images and {args.output}/studies; run summary: runs/{summary['run_id']}.json")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    config = train_config_from_args(args)
    init_ray(progress_bars=False)
    print(f"model directory: {run_training(config)}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    config = tune_config_from_args(args)
    init_ray(progress_bars=False)
    print(strict_json(run_tune(config)))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    init_ray(progress_bars=False)
    print(strict_json(evaluate(args.model_dir, args.data, args.split)))
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    init_ray(progress_bars=False)
    print(strict_json(summarize(ensemble_from_args(args))))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    config = compare_config_from_args(args)
    init_ray(progress_bars=False)
    if len(args.data) > 1:
        run_compare_across(config, args.data)
        print(f"summary: {config.output}/summary.md (and summary.json); one report per data set in {config.output}/<data folder name>/")
        return 0
    run_compare(config)
    print(f"report: {config.output}/report.html (also report.md, metrics.json, predictions.parquet, figures/)")
    return 0


def add_site_arguments(parser: argparse.ArgumentParser) -> None:
    """What calibrate and adapt share: the parent model, the site's ingest, the output, the site's name."""
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="the model directory to derive from")
    parser.add_argument("--data", required=True, help="the site's sample, as written by `lungray ingest` (every split is used)")
    parser.add_argument("--output", required=True, help="model directory to write (must not hold one)")
    parser.add_argument("--site", default=None, help="the site's name in the lineage (default: the --data folder's name)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient folds, the bootstrap and fine-tuning")


def add_operating_point_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--min-sensitivity", type=float, default=CalibrateConfig.min_sensitivity,
        help="the threshold is the most specific one reaching this sensitivity on the site's sample",
    )
    parser.add_argument("--folds", type=int, default=CalibrateConfig.folds, help="patient folds of the cross-validated estimate")
    parser.add_argument("--n-boot", type=int, default=CalibrateConfig.n_boot, help="patient-bootstrap resamples of the CIs")


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    add_site_arguments(parser)
    add_operating_point_arguments(parser)


def calibrate_config_from_args(args: argparse.Namespace) -> CalibrateConfig:
    return CalibrateConfig(
        model_dir=args.model_dir, data=args.data, output=args.output, min_sensitivity=args.min_sensitivity,
        site=args.site, folds=args.folds, n_boot=args.n_boot, seed=args.seed,
    )


def add_adapt_arguments(parser: argparse.ArgumentParser) -> None:
    add_site_arguments(parser)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--unlabelled", action="store_true", help="re-estimate BatchNorm statistics on the site's films (reads no label)")
    mode.add_argument("--labelled", action="store_true", help="fine-tune on part of the labelled sample; the rest sets the threshold")
    parser.add_argument("--batch-size", type=int, default=AdaptConfig.batch_size)
    parser.add_argument("--epochs", type=int, default=AdaptConfig.epochs, help="fine-tuning epochs (--labelled)")
    parser.add_argument("--lr", type=float, default=AdaptConfig.learning_rate, help="fine-tuning learning rate (--labelled)")
    parser.add_argument(
        "--holdout-fraction", type=float, default=AdaptConfig.holdout_fraction,
        help="share of the site's patients kept out of fine-tuning to choose the threshold (--labelled); "
        "the nearest 1/k (up to 0.5) or 1 - 1/k (above) for a whole k, as a stratified k-fold by patient holds out",
    )
    add_operating_point_arguments(parser)


def adapt_config_from_args(args: argparse.Namespace) -> AdaptConfig:
    return AdaptConfig(
        model_dir=args.model_dir, data=args.data, output=args.output, labelled=args.labelled, site=args.site,
        batch_size=args.batch_size, epochs=args.epochs, learning_rate=args.lr, holdout_fraction=args.holdout_fraction,
        min_sensitivity=args.min_sensitivity, folds=args.folds, n_boot=args.n_boot, seed=args.seed,
    )


def print_site_step(step: dict[str, object]) -> int:
    """The lineage step as JSON on stdout, its warnings also on stderr."""
    print(strict_json(step))
    for warning in step.get("warnings") or []:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    return print_site_step(calibrate(calibrate_config_from_args(args)))


def cmd_adapt(args: argparse.Namespace) -> int:
    return print_site_step(adapt(adapt_config_from_args(args)))


def add_invariance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="the model directory to measure")
    parser.add_argument(
        "--input", required=True,
        help="folder (or s3:// prefix) of films, decoded as screening decodes them; or an ingest (its stored images are perturbed)",
    )
    parser.add_argument("--dataset", choices=DATASETS, default=None, help="how to label INPUT, as for ingest (default: unlabelled)")
    parser.add_argument("--labels", default=None, help="labels CSV for --dataset csv / chestxray14")
    parser.add_argument("--output", default=None, help="also write the JSON report to this file")


def cmd_invariance(args: argparse.Namespace) -> int:
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)  # before the measurement, not after it
    report = strict_json(measure_invariance(args.model_dir, args.input, args.dataset, args.labels))
    print(report)
    if args.output:
        Path(args.output).write_text(report + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lungray", description=__doc__)
    verbose_help = "Ray's own console lines too (execution plans, worker groups, checkpoints)"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    commands = parser.add_subparsers(dest="command", required=True)
    subcommands = (
        ("ingest", "decode archives into sharded tensor Parquet with a patient split", add_ingest_arguments, cmd_ingest),
        ("train", "train a CNN or CNN-LSTM with Ray Train (DDP); rerun to resume", add_train_arguments, cmd_train),
        ("tune", "a Ray Tune sweep (ASHA) over a tune_spaces/ file; best trial exported; rerun to resume", add_tune_arguments, cmd_tune),
        ("evaluate", "metrics of a model directory on a split, as JSON", add_evaluate_arguments, cmd_evaluate),
        ("ensemble", "average model directories (+ test-time augmentation) into one, thresholded on val", add_ensemble_arguments, cmd_ensemble),
        ("compare", "compare model directories on a labelled split: report.md/.html, metrics.json", add_compare_arguments, cmd_compare),
        ("screen", "score an archive: per-image and per-study predictions, incremental", add_screen_arguments, cmd_screen),
        ("calibrate", "a site's threshold and temperature from its labelled sample, cross-validated", add_calibrate_arguments, cmd_calibrate),
        ("invariance", "how far probabilities move under a border, SIGMOID window, gamma and crop (JSON)", add_invariance_arguments, cmd_invariance),
        ("adapt", "adapt a model to a site: BatchNorm statistics (--unlabelled) or fine-tuning (--labelled)", add_adapt_arguments, cmd_adapt),
    )
    for name, help_text, add_arguments, run in subcommands:
        subparser = commands.add_parser(name, help=help_text)
        add_arguments(subparser)
        # Also after the command, where the jobs/ scripts' arguments go; SUPPRESS keeps a flag given before it.
        subparser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
        subparser.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger(PROGRESS_LOGGER).setLevel(logging.INFO)  # progress lines a person reads, without --verbose
    quiet_ray(args.verbose)
    try:
        return args.run(args)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        if isinstance(exc, RayError):
            raise  # a failure inside the run (a Ray task's error takes its cause's class): exit 1, with its traceback
        # Bad arguments or inputs: a message, not a traceback. Anything else fails loudly (exit 1).
        print(f"lungray {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
