"""Model selection at a new site: the exported weights (best home-validation AUROC) against the
last epoch's, each run paired on a site's labelled films; prints JSON.

    python bench/site_selection.py MODEL_DIR [MODEL_DIR ...] --site out/site-b [--split test]

Until `lungray train --select last` became the default, training exported the weights of the
epoch with the best validation AUROC on the home split. Whether that criterion tracks a new
site is measurable from what every run already keeps: its latest checkpoint
(`MODEL_DIR/_ray/train/checkpoint_*/state.pt`) holds the last epoch's weights (their moving
average where the run kept one, as the exported weights are). Both score the same films; the
difference (last - exported) comes with its patient bootstrap and DeLong's test; for a run
exported with `--select last` it is 0. The site's labels are used to measure only.

`--export DIR --home HOME_INGEST` also writes each run's last-epoch weights as the model
directory `lungray train --select last` exports (DIR/<run name>-last), for runs whose
checkpoints predate lungray keeping the last epoch's validation probabilities: the
threshold is chosen by the same rule on the same home val split, scored here.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lungray.evaluate import check_preprocessing, score_split  # noqa: E402
from lungray.ingest import load_summary  # noqa: E402
from lungray.metrics import delong_test, paired_bootstrap_auroc, roc_auc_score  # noqa: E402
from lungray.modeldir import FORMAT_KEYS, ModelDir, load_model_dir, save_model_dir  # noqa: E402
from lungray.report.compare import read_cases  # noqa: E402
from lungray.train.export import operating_point  # noqa: E402
from lungray.train.loop import last_validated_weights, read_progress, read_state  # noqa: E402
from site_levers import site_figures  # noqa: E402 - the same figures as the lever table

LEVER_TABLE_RESAMPLES = 1000  # bootstrap resamples of the AUROC CIs in docs/results.md's lever table


def latest_checkpoint(model_dir: str) -> Path:
    checkpoints = sorted((path for path in Path(model_dir, "_ray", "train").glob("checkpoint_*") if path.is_dir()), key=lambda path: read_progress(path).next_epoch)
    if not checkpoints:
        raise FileNotFoundError(f"{model_dir} keeps no training checkpoint")
    return checkpoints[-1]


def last_epoch_model(exported: ModelDir, checkpoint: Path) -> ModelDir:
    """The exported model with the checkpoint's last-epoch weights (averaged where the run averaged)."""
    model = copy.deepcopy(exported.model)
    model.load_state_dict(last_validated_weights(read_state(checkpoint)), strict=True)
    return replace(exported, model=model.eval())


def export_last(exported: ModelDir, last: ModelDir, last_epoch: int, home: str, output: Path) -> str:
    """Save `last` as the model directory a `--select last` export of the same run would be."""
    labels, prob = score_split(last, home, "val")
    training = exported.meta["training"]
    meta = {key: value for key, value in exported.meta.items() if key not in FORMAT_KEYS}
    meta.update(
        training={**training, "select": "last"},
        selected_epoch=last_epoch,
        **operating_point(labels, prob, training["min_sensitivity"]),
    )
    save_model_dir(output, last.model.state_dict(), meta)
    return str(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--site", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--export", type=Path, help="write each run's last-epoch model directory here")
    parser.add_argument("--home", help="the home ingest whose val split chooses an exported threshold")
    args = parser.parse_args()
    if args.export and not args.home:
        parser.error("--export needs --home")
    cases = read_cases(args.site, args.split)
    summary = load_summary(args.site)
    results = []
    for path in args.models:
        exported = load_model_dir(path)
        check_preprocessing(exported, summary, args.site)
        checkpoint = latest_checkpoint(path)
        progress = read_progress(checkpoint)
        exported_prob = exported.predict_proba(cases.images)
        last = last_epoch_model(exported, checkpoint)
        last_prob = last.predict_proba(cases.images)
        figures = {}
        if args.export:
            last_dir = export_last(exported, last, progress.next_epoch - 1, args.home, args.export / f"{Path(path).name}-last")
            home_labels, home_prob = score_split(load_model_dir(last_dir), args.home, "test")
            figures = {"exported_last": {"model_dir": last_dir, "home_test_auroc": roc_auc_score(home_labels, home_prob),
                                         "site": site_figures(last_dir, args.site, args.split, LEVER_TABLE_RESAMPLES)}}
        results.append(
            {
                "model_dir": path,
                "best_epoch": progress.best_epoch,
                "last_epoch": progress.next_epoch - 1,
                "exported_auroc": roc_auc_score(cases.labels, exported_prob),
                "last_epoch_auroc": roc_auc_score(cases.labels, last_prob),
                "last_minus_exported": paired_bootstrap_auroc(cases.labels, last_prob, exported_prob, groups=cases.patients, n_boot=args.n_boot),
                "delong": delong_test(cases.labels, last_prob, exported_prob),
                **figures,
            }
        )
        print(json.dumps(results[-1], default=float), file=sys.stderr, flush=True)
    print(json.dumps({"site": args.site, "results": results}, indent=1, default=float))


if __name__ == "__main__":
    main()
