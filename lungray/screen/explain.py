"""`--explain`: a Grad-CAM overlay for each flagged study, from the image that flagged it.

Only flagged studies are explained, on the driver, after scoring: a handful of images a
night, each re-read and preprocessed by the one row path so the overlay shows exactly
what the model saw.
"""

from __future__ import annotations

import numpy as np
import torch

from lungray.io.decode import DecodeOptions
from lungray.io.rows import process_file
from lungray.modeldir import ModelDir
from lungray.preprocess import to_float
from lungray.report.gradcam import gradcam, overlay_png


def explain(row: dict, model: ModelDir, decode: DecodeOptions, max_file_bytes: int) -> bytes | None:
    """The overlay PNG of one image, or None if it can no longer be read."""
    _, stored = process_file(row["path"], row["path"], row["size"], model.preprocess, decode, max_file_bytes, scope=None, salt=None)
    if stored is None:
        return None
    image = torch.from_numpy(to_float(stored))[None, None]
    heat = gradcam(model.model, image)
    display = np.rint(to_float(stored) * 255).astype(np.uint8)
    return overlay_png(display, heat)
