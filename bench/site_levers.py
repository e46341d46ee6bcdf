"""What each training lever buys at a new site: train recipe variants at home, score them on a
site's labelled films, print JSON.

    python bench/site_levers.py --data out/kermany-random --site out/site-b --output out/levers \\
        [--model cnn cnn_lstm] [--variant baseline augment regularise default wide ...] [--seed 0]

Every variant is `lungray train` (the library's `run_training`) on the home data with one
recipe; `baseline` is the recipe before the site-robust defaults (the affine and photometric
augmentation only, no label smoothing, raw weights), so the other variants are compared with
a plain recipe trained in the same way on the same machine; `cosine` is today's default. A variant already trained into
`OUTPUT/MODEL-VARIANT-sSEED` is not trained again (run_training leaves a finished run alone),
so the script can be rerun to add variants or seeds.

Per variant: the site's AUROC with its patient-bootstrap CI, specificity at sensitivity 0.95
(any threshold: the ranking, not the stored threshold), and the stored threshold's
sensitivity / specificity; the home test split's AUROC; epochs and training minutes. The
site's labels are used to measure only: no weight or threshold sees them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lungray.evaluate import check_preprocessing, score_split  # noqa: E402
from lungray.ingest import load_summary  # noqa: E402
from lungray.metrics import binary_metrics, bootstrap_ci, roc_auc_score, specificity_at_sensitivity  # noqa: E402
from lungray.modeldir import load_model_dir  # noqa: E402
from lungray.raysession import init_ray  # noqa: E402
from lungray.report.compare import read_cases  # noqa: E402 - the report's loader: patients as bootstrap groups
from lungray.train.augment import ADDED_SINCE_FIRST_RELEASE, AugmentConfig  # noqa: E402
from lungray.train.trainer import TrainConfig, run_training  # noqa: E402

PLAIN_AUGMENT = replace(AugmentConfig(), gamma=0.25, **ADDED_SINCE_FIRST_RELEASE)
# The levers were measured on top of the recipe that was the default before the cosine
# schedule replaced it (`default`, whose runs are out/levers/*-default-*); `cosine` is today's
# TrainConfig. Each variant names its schedule, so that a new seed trains what the figures
# in docs/results.md were measured with.
PLATEAU = {"schedule": "plateau"}
VARIANTS = {
    "baseline": {"augment": PLAIN_AUGMENT, "label_smoothing": 0.0, "ema_decay": 0.0, **PLATEAU},
    "augment": {"augment": AugmentConfig(), "label_smoothing": 0.0, "ema_decay": 0.0, **PLATEAU},
    "regularise": {"augment": PLAIN_AUGMENT, "label_smoothing": TrainConfig.label_smoothing, "ema_decay": TrainConfig.ema_decay, **PLATEAU},
    "default": PLATEAU,
    # Levers on top of `default`, one at a time.
    "wide": {"model_overrides": {"widths": [24, 48, 96, 192]}, **PLATEAU},  # a stronger trunk: 1.5x the channels, about 2.2x the FLOPs
    "mixup": {"mixup_alpha": 0.2, **PLATEAU},
    "cosine": {"schedule": "cosine"},
}


def site_figures(model_dir: str, site: str, split: str, n_boot: int) -> dict:
    """The model on the labelled images of the site sample's `split` (ingest it with --split 0,0,1)."""
    model = load_model_dir(model_dir)
    check_preprocessing(model, load_summary(site), site)
    cases = read_cases(site, split)
    prob = model.predict_proba(cases.images)
    auroc, low, high = bootstrap_ci(cases.labels, prob, roc_auc_score, groups=cases.patients, n_boot=n_boot)
    at_threshold = binary_metrics(cases.labels, prob, model.threshold)
    return {
        "images": int(len(prob)),
        "patients": int(len(set(cases.patients))),
        "auroc": auroc,
        "auroc_ci": [low, high],
        "specificity_at_sensitivity_0.95": specificity_at_sensitivity(cases.labels, prob, 0.95),
        "stored_threshold": {k: at_threshold[k] for k in ("threshold", "recall", "specificity", "accuracy")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="home ingest (train/val/test splits)")
    parser.add_argument("--site", required=True, help="the site's labelled ingest")
    parser.add_argument("--site-split", default="test", help="its split holding the sample (default: test)")
    parser.add_argument("--output", required=True, help="folder for the model directories")
    parser.add_argument("--model", nargs="+", default=["cnn"], choices=["cnn", "cnn_lstm"])
    parser.add_argument("--variant", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args()

    init_ray(progress_bars=False)
    results = []
    for model in args.model:
        for seed in args.seed:
            for variant in args.variant:
                output = str(Path(args.output) / f"{model}-{variant}-s{seed}")
                config = TrainConfig(model=model, data=args.data, output=output, seed=seed, **VARIANTS[variant])
                run_training(config)
                meta = json.loads((Path(output) / "model.json").read_text())
                home_labels, home_prob = score_split(load_model_dir(output), args.data, "test")
                results.append(
                    {
                        "model": model,
                        "variant": variant,
                        "seed": seed,
                        "model_dir": output,
                        "epochs": len(meta["history"]),
                        "train_minutes": sum(epoch["seconds"] for epoch in meta["history"]) / 60,
                        "home_test_auroc": roc_auc_score(home_labels, home_prob),
                        "site": site_figures(output, args.site, args.site_split, args.n_boot),
                    }
                )
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"site": args.site, "home": args.data, "results": results}, indent=2))


if __name__ == "__main__":
    main()
