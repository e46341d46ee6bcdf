"""Two model directories paired on a site's labelled films: AUROC difference with its patient bootstrap, and DeLong; prints JSON.

    python bench/site_paired.py MODEL_A MODEL_B [MODEL_A MODEL_B ...] --site out/site-b [--split test]

For the comparisons `lungray compare` refuses because the two models were stamped with
different decoder versions while scored on one ingest (see docs/results.md); a model
preprocessed otherwise than the ingest is still refused. Both models
score the same films (`lungray.report.compare.read_cases`, patients as bootstrap groups);
the difference is A - B.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lungray.evaluate import check_preprocess  # noqa: E402
from lungray.ingest import load_summary  # noqa: E402
from lungray.metrics import delong_test, paired_bootstrap_auroc  # noqa: E402
from lungray.modeldir import load_model_dir  # noqa: E402
from lungray.report.compare import read_cases  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="pairs of model directories: A B [A B ...]")
    parser.add_argument("--site", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--n-boot", type=int, default=2000)
    args = parser.parse_args()
    if len(args.models) % 2:
        parser.error("models come in pairs")
    cases = read_cases(args.site, args.split)
    summary = load_summary(args.site)
    scores = {}
    for path in dict.fromkeys(args.models):
        model = load_model_dir(path)
        check_preprocess(model, summary, args.site)
        scores[path] = model.predict_proba(cases.images)
    pairs = []
    for a, b in zip(args.models[::2], args.models[1::2]):
        paired = paired_bootstrap_auroc(cases.labels, scores[a], scores[b], groups=cases.patients, n_boot=args.n_boot)
        pairs.append({"a": a, "b": b, "paired_bootstrap": paired, "delong": delong_test(cases.labels, scores[a], scores[b])})
    print(json.dumps(pairs, indent=1, default=float))


if __name__ == "__main__":
    main()
