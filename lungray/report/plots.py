"""The comparison report's figures, as PNG bytes.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas rather than through
pyplot, so no global figure state or display backend is involved and a report can be made
on a headless worker. Curves come from scikit-learn's display classes, so the plotted ROC
and precision-recall curves are the ones its `roc_auc_score` and `average_precision_score`
summarise.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay

CLASS_NAMES = ("normal", "abnormal")
PANEL_INCHES = 4.5
DPI = 100


def literal(text: str) -> str:
    """`text` as matplotlib shows it verbatim: a model's name holds its site's name, and `$`
    would start mathtext (garbled, or an error that loses the whole report)."""
    return text.replace("$", r"\$")


def png_bytes(figure: Figure) -> bytes:
    """The figure rendered by Agg as PNG."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def roc_figure(y_true: np.ndarray, probs: Mapping[str, np.ndarray]) -> Figure:
    """Every model's ROC curve on one axis, with the chance diagonal."""
    figure = Figure(layout="constrained", figsize=(PANEL_INCHES + 1, PANEL_INCHES))
    axis = figure.subplots()
    for name, prob in probs.items():
        RocCurveDisplay.from_predictions(y_true, prob, name=literal(name), ax=axis)
    axis.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    axis.set(title="ROC curve", xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)")
    axis.legend(loc="lower right")
    return figure


def pr_figure(y_true: np.ndarray, probs: Mapping[str, np.ndarray]) -> Figure:
    """Every model's precision-recall curve on one axis, with the prevalence as the chance line."""
    figure = Figure(layout="constrained", figsize=(PANEL_INCHES + 1, PANEL_INCHES))
    axis = figure.subplots()
    for name, prob in probs.items():
        PrecisionRecallDisplay.from_predictions(y_true, prob, name=literal(name), ax=axis)
    axis.axhline(float(np.mean(y_true)), linestyle=":", color="grey", label="chance (prevalence)")
    axis.set(title="Precision-recall curve", xlabel="recall (sensitivity)", ylabel="precision (positive predictive value)")
    axis.legend(loc="lower left")
    return figure


def confusion_figure(matrices: Mapping[str, Sequence[Sequence[int]]]) -> Figure:
    """One confusion matrix per model (`[[tn, fp], [fn, tp]]`, at the model's stored threshold)."""
    figure = Figure(layout="constrained", figsize=(PANEL_INCHES * len(matrices), PANEL_INCHES))
    axes = np.atleast_1d(figure.subplots(1, len(matrices)))
    for axis, (name, matrix) in zip(axes, matrices.items()):
        ConfusionMatrixDisplay(np.asarray(matrix), display_labels=CLASS_NAMES).plot(ax=axis, colorbar=False, cmap="Blues")
        axis.set_title(literal(name))
    return figure


def reliability_figure(calibrations: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Observed abnormal fraction against mean predicted probability per bin, for every model.

    `calibrations` holds `lungray.metrics.calibration_curve_data` results; marker area
    follows the bin's case count, so sparse bins do not look as certain as full ones.
    """
    figure = Figure(layout="constrained", figsize=(PANEL_INCHES + 1, PANEL_INCHES))
    axis = figure.subplots()
    axis.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect calibration")
    for name, curve in calibrations.items():
        counts = np.asarray(curve["count"], dtype=float)
        line = axis.plot(curve["mean_predicted"], curve["fraction_positive"], label=f"{literal(name)} (ECE {curve['ece']:.3f})")[0]
        axis.scatter(curve["mean_predicted"], curve["fraction_positive"], s=20 + 180 * counts / counts.max(), color=line.get_color())
    axis.set(
        title="Reliability diagram", xlabel="mean predicted probability of abnormal",
        ylabel="observed fraction abnormal", xlim=(0, 1), ylim=(0, 1),
    )
    axis.legend(loc="upper left")
    return figure


def training_figure(histories: Mapping[str, Sequence[Mapping[str, float]]]) -> Figure:
    """Loss (train solid, validation dashed) and validation AUROC per epoch, from model.json histories."""
    figure = Figure(layout="constrained", figsize=(2 * PANEL_INCHES + 1, PANEL_INCHES))
    loss_axis, auroc_axis = figure.subplots(1, 2)
    for name, history in histories.items():
        epochs = [record["epoch"] + 1 for record in history]  # counted from 1, as the training log does
        line = loss_axis.plot(epochs, [record["train_loss"] for record in history], label=f"{literal(name)} train")[0]
        loss_axis.plot(epochs, [record["val_loss"] for record in history], linestyle="--", color=line.get_color(), label=f"{literal(name)} validation")
        auroc_axis.plot(epochs, [record["val_auroc"] for record in history], marker="o", label=literal(name))
    loss_axis.set(title="Loss", xlabel="epoch", ylabel="class-weighted cross-entropy")
    auroc_axis.set(title="Validation AUROC", xlabel="epoch", ylabel="AUROC")
    for axis in (loss_axis, auroc_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_axis.legend()
    auroc_axis.legend(loc="lower right")
    return figure
