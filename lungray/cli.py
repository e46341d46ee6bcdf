"""`lungray` command line: argument parsing only; the library does the work."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from lungray.ensemble import add_ensemble_arguments, ensemble_from_args, summarize
from lungray.evaluate import add_evaluate_arguments, evaluate
from lungray.ingest import IngestConfig, SourceSpec, run_ingest
from lungray.io.decode import DecodeOptions
from lungray.io.scope import CHECKED_FIELDS, Scope
from lungray.preprocess import ASPECT_POLICIES, INTENSITY_POLICIES, PreprocessConfig
from lungray.raysession import init_ray
from lungray.report.compare import add_compare_arguments, compare_config_from_args, run_compare
from lungray.screen.pipeline import ScreenConfig, run_screen
from lungray.screen.tables import AGGREGATES
from lungray.sources import DATASETS
from lungray.train.trainer import add_train_arguments, run_training, train_config_from_args
from lungray.tune import add_tune_arguments, run_tune, tune_config_from_args


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
        help="run without LUNGRAY_PATIENT_SALT, keying with a random salt for this run only (demo and throwaway data)",
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


def cmd_ingest(args: argparse.Namespace) -> int:
    config = ingest_config_from_args(args)
    init_ray()
    summary = run_ingest(config)
    print(json.dumps({key: summary[key] for key in ("files", "by_status", "by_label", "splits", "images_per_second")}, indent=2))
    return 0


def add_screen_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (local or s3://)")
    parser.add_argument("--input", required=True, help="archive: local folder or s3://bucket/prefix, recursive")
    parser.add_argument("--output", required=True, help="output root: images/, studies/, runs/")
    parser.add_argument("--date", default=None, help="scored_date partition, YYYY-MM-DD (default: today, UTC)")
    parser.add_argument("--incremental", action="store_true", help="skip files this model already scored (same path, size, mtime)")
    parser.add_argument("--aggregate", choices=AGGREGATES, default="max", help="study probability from its images")
    parser.add_argument("--batch-size", type=int, default=None, help="inference batch (default: 32 on CPU, 512 on GPU)")
    parser.add_argument("--actors", type=int, default=None, help="model actors (default: one per GPU, or one per two CPUs)")
    parser.add_argument(
        "--gpu", action="store_true",
        help="score on GPU actors even when no GPU node is up yet (the autoscaler starts them); default: GPUs if present",
    )
    parser.add_argument("--max-pixels", type=int, default=DecodeOptions.max_pixels, help="decompression bomb limit")
    parser.add_argument("--explain", action="store_true", help="a Grad-CAM overlay PNG for each flagged study (explain/)")
    add_scope_and_privacy_arguments(parser)


def screen_config_from_args(args: argparse.Namespace) -> ScreenConfig:
    optional = {"date": args.date} if args.date else {}
    return ScreenConfig(
        model=args.model, input=args.input, output=args.output, incremental=args.incremental,
        aggregate=args.aggregate, explain=args.explain, batch_size=args.batch_size, actors=args.actors, gpu=args.gpu,
        max_pixels=args.max_pixels, scope=Scope.from_settings(args.scope),
        pseudonymize=args.pseudonymize, throwaway_salt=args.throwaway_salt, **optional,
    )


def cmd_screen(args: argparse.Namespace) -> int:
    config = screen_config_from_args(args)
    init_ray(progress_bars=True)
    summary = run_screen(config)
    print(json.dumps({key: summary[key] for key in ("run_id", "files_listed", "files_scored", "by_status", "studies_flagged", "images_per_second")}, indent=2))
    print(f"predictions: {args.output}/images/scored_date={summary['scored_date']}/ and studies/; run summary: runs/{summary['run_id']}.json")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    config = train_config_from_args(args)
    init_ray(progress_bars=False)
    print(f"model directory: {run_training(config)}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    config = tune_config_from_args(args)
    init_ray(progress_bars=False)
    print(json.dumps(run_tune(config), indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    init_ray(progress_bars=False)
    print(json.dumps(evaluate(args.model_dir, args.data, args.split), indent=2))
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    init_ray(progress_bars=False)
    print(json.dumps(summarize(ensemble_from_args(args)), indent=2))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    config = compare_config_from_args(args)
    init_ray(progress_bars=False)
    run_compare(config)
    print(f"report: {config.output}/report.html (also report.md, metrics.json, predictions.parquet, figures/)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lungray", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    subcommands = (
        ("ingest", "decode archives into sharded tensor Parquet with a patient split", add_ingest_arguments, cmd_ingest),
        ("train", "train a CNN or CNN-LSTM with Ray Train (DDP); rerun to resume", add_train_arguments, cmd_train),
        ("tune", "a Ray Tune sweep (ASHA) over a tune_spaces/ file; best trial exported; rerun to resume", add_tune_arguments, cmd_tune),
        ("evaluate", "metrics of a model directory on a split, as JSON", add_evaluate_arguments, cmd_evaluate),
        ("ensemble", "average model directories (+ test-time augmentation) into one, thresholded on val", add_ensemble_arguments, cmd_ensemble),
        ("compare", "compare model directories on a labelled split: report.md/.html, metrics.json", add_compare_arguments, cmd_compare),
        ("screen", "score an archive: per-image and per-study predictions, incremental", add_screen_arguments, cmd_screen),
    )
    for name, help_text, add_arguments, run in subcommands:
        subparser = commands.add_parser(name, help=help_text)
        add_arguments(subparser)
        subparser.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        # Bad arguments or inputs: a message, not a traceback. Anything else fails loudly (exit 1).
        print(f"lungray {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
