"""Model selection at a new site: the exported weights (best home-validation AUROC) against the
last epoch's, each run paired on a site's labelled films; prints JSON.

    python bench/site_selection.py MODEL_DIR [MODEL_DIR ...] --site out/site-b [--split test]

Training exports the weights of the epoch with the best validation AUROC on the home split.
Whether that criterion tracks a new site is measurable from what every run already keeps:
its latest checkpoint (`MODEL_DIR/_ray/train/checkpoint_*/state.pt`) holds the last epoch's
weights (their moving average where the run kept one, as the exported weights are). Both
score the same films; the difference (last - exported) comes with its patient bootstrap and
DeLong's test. The site's labels are used to measure only.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lungray.metrics import delong_test, paired_bootstrap_auroc, roc_auc_score  # noqa: E402
from lungray.modeldir import ModelDir, load_model_dir  # noqa: E402
from lungray.report.compare import read_cases  # noqa: E402
from lungray.train.loop import read_progress, read_state  # noqa: E402

AVERAGED_PREFIX = "module."  # AveragedModel's keys: the wrapped module's, plus its update count


def latest_checkpoint(model_dir: str) -> Path:
    checkpoints = sorted((path for path in Path(model_dir, "_ray", "train").glob("checkpoint_*") if path.is_dir()), key=lambda path: read_progress(path).next_epoch)
    if not checkpoints:
        raise FileNotFoundError(f"{model_dir} keeps no training checkpoint")
    return checkpoints[-1]


def last_epoch_model(exported: ModelDir, checkpoint: Path) -> ModelDir:
    """The exported model with the checkpoint's last-epoch weights (averaged where the run averaged)."""
    state = read_state(checkpoint)
    if "average" in state:
        weights = {key.removeprefix(AVERAGED_PREFIX): value for key, value in state["average"].items() if key.startswith(AVERAGED_PREFIX)}
    else:
        weights = state["model"]
    model = copy.deepcopy(exported.model)
    model.load_state_dict(weights, strict=True)
    return replace(exported, model=model.eval())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--site", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--n-boot", type=int, default=2000)
    args = parser.parse_args()
    cases = read_cases(args.site, args.split)
    results = []
    for path in args.models:
        exported = load_model_dir(path)
        checkpoint = latest_checkpoint(path)
        progress = read_progress(checkpoint)
        exported_prob = exported.predict_proba(cases.images)
        last_prob = last_epoch_model(exported, checkpoint).predict_proba(cases.images)
        results.append(
            {
                "model_dir": path,
                "best_epoch": progress.best_epoch,
                "last_epoch": progress.next_epoch - 1,
                "exported_auroc": roc_auc_score(cases.labels, exported_prob),
                "last_epoch_auroc": roc_auc_score(cases.labels, last_prob),
                "last_minus_exported": paired_bootstrap_auroc(cases.labels, last_prob, exported_prob, groups=cases.patients, n_boot=args.n_boot),
                "delong": delong_test(cases.labels, last_prob, exported_prob),
            }
        )
        print(json.dumps(results[-1], default=float), file=sys.stderr, flush=True)
    print(json.dumps({"site": args.site, "results": results}, indent=1, default=float))


if __name__ == "__main__":
    main()
