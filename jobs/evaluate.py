"""Ray job: print a model directory's metrics on a split of an ingested dataset as JSON.

    ray job submit --working-dir . -- python jobs/evaluate.py MODEL_DIR INGESTED [--split test]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir, when not installed

from lungray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
