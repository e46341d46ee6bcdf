"""Ray job: nightly screening of an archive (exit 0 when the run finished, even with files in error).

    ray job submit --working-dir . -- python jobs/screen.py --model MODEL_DIR --input s3://archive/tonight --output s3://lungray/screen --incremental
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir, when not installed

from lungray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["screen", *sys.argv[1:]]))
