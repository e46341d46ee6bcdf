"""Ray job: train a CNN or CNN-LSTM with Ray Train (DDP) into a model directory; rerun to resume.

    ray job submit --working-dir . -- python jobs/train.py --model cnn --data INGESTED --output MODEL_DIR [--workers N] [--gpu]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir, when not installed

from lungray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
