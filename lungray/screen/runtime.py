"""CPU scoring through ONNX Runtime: the model directory's network exported once per model
actor and run by ONNX Runtime, which fuses BatchNorm into the convolutions and picks its own
CPU kernels.

Why: on CPU the model actor is the screening pipeline's serial stage. On the 2-core VM of
docs/results.md the default CNN and CNN-LSTM scored 540-555 images/s on one thread through
ONNX Runtime against 259-273 for the BatchNorm-folded torch model (1,000-1,070 against
495-524 on two threads), with logits within 3e-8 of torch's.

The export is a trace of the loaded model in eval mode (`torch.onnx.export`), so what runs
is the model directory's own network: temperature and the softmax stay in
`lungray.modeldir.proba_from_logits`, and the input goes through `model_input` as for torch.
Before an actor uses the session, it scores a batch of another size than the export's
example with both and compares the logits: a network the exporter or ONNX Runtime cannot
take, or whose trace froze something it should not have (a batch size read as a Python
int), is scored by torch instead: slower, never different.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable

import numpy as np
import torch

from lungray.modeldir import ModelDir, model_input, proba_from_logits

log = logging.getLogger(__name__)

INPUT, OUTPUT = "image", "logits"


def export_onnx(model: ModelDir) -> bytes:
    """The model directory's network as an ONNX graph, batch size free."""
    example = model_input(np.zeros((2, model.preprocess.size, model.preprocess.size), dtype=np.float32)).contiguous()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on tracing and its own deprecations
        torch.onnx.export(
            model.model.eval(),
            (example,),
            buffer,
            dynamo=False,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
        )
    return buffer.getvalue()


def check_against_torch(session: object, model: ModelDir, batch: int = 3, tolerance: float = 1e-4) -> None:
    """Raise unless the session gives torch's logits on a random batch of `batch` images."""
    images = np.random.default_rng(0).random((batch, model.preprocess.size, model.preprocess.size), dtype=np.float32)
    expected = model.predict_logits(images, batch_size=batch)
    (logits,) = session.run([OUTPUT], {INPUT: model_input(images).contiguous().numpy()})
    if logits.shape != expected.shape or not np.allclose(logits, expected, atol=tolerance, rtol=0):
        difference = np.abs(logits - expected).max() if logits.shape == expected.shape else f"shape {logits.shape}"
        raise ValueError(f"ONNX Runtime's logits differ from torch's on {batch} images ({difference})")


def onnx_scorer(model: ModelDir, threads: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """`model.predict_proba` through ONNX Runtime on `threads` threads, or None (with the
    reason logged) where the network cannot be exported or run there."""
    try:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(export_onnx(model), options, providers=["CPUExecutionProvider"])
        check_against_torch(session, model)
    except Exception as exc:  # noqa: BLE001 - any failure means torch scores, as before
        log.warning("model %s is scored by torch: no ONNX Runtime session (%s: %s)", model.model_id, type(exc).__name__, exc)
        return None

    def predict_proba(images: np.ndarray) -> np.ndarray:
        model.check_input(images)
        if len(images) == 0:
            return np.zeros(0, dtype=np.float64)
        (logits,) = session.run([OUTPUT], {INPUT: model_input(images).contiguous().numpy()})
        return proba_from_logits(logits, model.temperature)

    return predict_proba
