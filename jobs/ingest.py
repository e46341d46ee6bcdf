"""Ray job: ingest archives into sharded tensor Parquet.

    ray job submit --working-dir . -- python jobs/ingest.py INPUT OUTPUT --dataset kermany
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir, when not installed

from lungray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
