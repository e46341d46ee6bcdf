"""Ray job: a hyperparameter sweep with Ray Tune (ASHA) over a search-space file; rerun to resume.

    ray job submit --working-dir . -- python jobs/tune.py --space tune_spaces/cnn_lstm.yaml --data INGESTED --samples N --output DIR [--storage s3://...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir, when not installed

from lungray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
