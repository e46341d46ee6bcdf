"""Ray job: compare model directories on a labelled split and write the report folder.

    ray job submit --working-dir . -- python jobs/compare.py MODEL_DIR [MODEL_DIR ...] \
        --data INGESTED --output REPORT_DIR [--split test]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir, when not installed

from lungray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
