"""`lungray adapt`: a model directory re-fitted to a site's films, with or without their labels.

--unlabelled (AdaBN, Li et al. 2016): every BatchNorm's running mean and variance become
those of its input over the site's images. A new detector, exposure or processing shifts
the trunk's activations; the BatchNorm statistics are where the network stores what it
expects, and re-estimating them on the site's own films needs no label. The statistics
are set layer by layer in network order, each the exact mean and unbiased variance of its
input over all site images, with the layers before it already adapted and the network in
eval mode (dropout off, no gradient): so each layer is fitted to exactly what it will see
at scoring time, independent of the batch size (a train-mode pass with cumulative
averaging would give the same first layer, and deeper layers fitted to batch-normalised
inputs instead). Weights and the threshold stay the parent's: without labels nothing can
re-choose the threshold; `lungray calibrate` on a labelled sample does that afterwards.

--labelled: a few epochs of fine-tuning at a small learning rate on a patient-disjoint
part of the labelled sample, with the training augmentation; the rest (`holdout_fraction`
of the patients, both classes kept in proportion) chooses the threshold and temperature,
and a cross-validation inside it estimates the threshold's sensitivity and specificity.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from torch import nn

from lungray.metrics import THRESHOLD_RULE, bootstrap_ci
from lungray.modeldir import ModelDir, load_model_dir, model_input
from lungray.site.calibrate import calibration_record, check_calibration_settings
from lungray.site.data import SiteSample, read_site_sample
from lungray.site.lineage import check_free, earlier_use, kept_operating_point, save_derived, site_name, written_step
from lungray.train.augment import AugmentConfig, augment_batch


@dataclass(frozen=True)
class AdaptConfig:
    """Which model and site sample, whether labels are used, and the fine-tuning settings."""

    model_dir: str
    data: str
    output: str
    labelled: bool
    site: str | None = None
    batch_size: int = 32
    # Fine-tuning only (labelled):
    epochs: int = 3
    learning_rate: float = 1e-4
    holdout_fraction: float = 0.3
    min_sensitivity: float = 0.95
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    folds: int = 5
    n_boot: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (BatchNorm trains on batches), got {self.batch_size}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must lie in (0, 1), got {self.holdout_fraction}")
        check_calibration_settings(self.min_sensitivity, self.folds, self.n_boot)  # before minutes of fine-tuning


class _Captured(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward pass is not run."""


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers in definition order, which is the order they run in (Sequential trunks)."""
    return [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]


def _batches(images: np.ndarray, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), batch_size):
        yield model_input(images[start : start + batch_size], device)


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, images: np.ndarray, batch_size: int = 32) -> int:
    """Set every BatchNorm's running statistics to its input's over `images` (module docstring); returns the layer count."""
    model.eval()
    device = next(model.parameters()).device
    layers = batchnorm_layers(model)
    for layer in layers:
        channels = layer.num_features
        total = torch.zeros(channels, dtype=torch.float64, device=device)
        squares = torch.zeros(channels, dtype=torch.float64, device=device)
        count = 0

        def accumulate(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            nonlocal total, squares, count
            values = inputs[0].double().transpose(0, 1).reshape(channels, -1)
            total += values.sum(dim=1)
            squares += (values * values).sum(dim=1)
            count += values.shape[1]
            raise _Captured

        handle = layer.register_forward_pre_hook(accumulate)
        try:
            for batch in _batches(images, batch_size, device):
                try:
                    model(batch)
                except _Captured:
                    pass
        finally:
            handle.remove()
        if count < 2:
            raise ValueError("adapting BatchNorm statistics needs at least two values per channel")
        mean = total / count
        variance = (squares - count * mean * mean).clamp_min(0.0) / (count - 1)  # unbiased, as BatchNorm keeps it
        layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
        layer.running_var.copy_(variance.to(layer.running_var.dtype))
    return len(layers)


def fine_tune(model: nn.Module, images: np.ndarray, labels: np.ndarray, config: AdaptConfig) -> list[dict[str, float]]:
    """A few epochs of AdamW on (images, labels) with the training augmentation; the model ends in eval mode.

    Cross-entropy on the model's output is right for single models (logits) and ensembles
    (log mean probabilities, which softmax maps back to the probabilities).
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    targets = torch.from_numpy(labels.astype(np.int64))
    history = []
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(images), generator=generator).numpy()
        loss_sum, seen = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            chosen = order[start : start + config.batch_size]
            if chosen.size < 2:  # a batch of one cannot train BatchNorm
                continue
            inputs = augment_batch(model_input(images[chosen], device), config.augment, generator)
            loss = F.cross_entropy(model(inputs).float(), targets[chosen].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * chosen.size
            seen += chosen.size
        history.append({"epoch": epoch, "train_loss": loss_sum / max(seen, 1)})
    model.eval()
    return history


def holdout_split(sample: SiteSample, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fine-tune, hold-out) indices: whole patients, classes in proportion (one fold of a
    stratified k-fold by patient). The hold-out is the share nearest `fraction` that a whole k
    gives: one fold, 1/k, up to a half; above a half, all folds but one, 1 - 1/k (0.3: a
    third; 0.8: four fifths)."""
    assert sample.labels is not None
    folds = max(2, round(1 / fraction)) if fraction <= 0.5 else max(2, round(1 / (1 - fraction)))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    rest, fold = next(splitter.split(np.zeros(len(sample.labels)), sample.labels, groups=sample.patients))
    fit, held_out = (rest, fold) if fraction <= 0.5 else (fold, rest)
    for name, part in (("fine-tuning", fit), ("hold-out", held_out)):
        if np.unique(sample.labels[part]).size < 2:
            raise ValueError(f"the sample is too small to keep both classes in its {name} part")
    return fit, held_out


def _auroc_with_ci(labels: np.ndarray, logits: np.ndarray, patients: np.ndarray, config: AdaptConfig) -> dict[str, float]:
    score = logits[:, 1] - logits[:, 0]  # the log-odds: any temperature ranks the same
    value, low, high = bootstrap_ci(labels, score, roc_auc_score, groups=patients, n_boot=config.n_boot, seed=config.seed)
    return {"value": value, "ci_low": low, "ci_high": high}


def adapt(config: AdaptConfig) -> dict[str, Any]:
    """Write the adapted model directory; returns the lineage step written (the CLI's JSON)."""
    check_free(config.output)
    parent = load_model_dir(config.model_dir)
    sample = read_site_sample(config.data, parent, labelled=config.labelled)
    site = site_name(config.site, config.data)
    output = (adapt_labelled if config.labelled else adapt_unlabelled)(parent, sample, site, config)
    return written_step(output)


def adapt_unlabelled(parent: ModelDir, sample: SiteSample, site: str, config: AdaptConfig) -> Path:
    """AdaBN on a copy of the parent; its threshold (and any temperature) are kept, as nothing can re-choose them."""
    model = copy.deepcopy(parent.model)
    n_layers = adapt_batchnorm(model, sample.images, config.batch_size)
    if n_layers == 0:
        raise ValueError(f"{config.model_dir} has no BatchNorm layer to adapt")
    step = {
        "step": "adapt-unlabelled",
        "method": "AdaBN (BatchNorm statistics re-estimated)",
        "site": site,
        **sample.describe(),
        "batchnorm_layers": n_layers,
        "threshold": "the parent's: no labels to re-choose it (run calibrate on a labelled sample)",
        "warnings": kept_operating_point(parent.meta, "adapt-unlabelled"),
    }
    policy = parent.meta.get("threshold_policy")
    if policy:  # chosen for other probabilities than this model's: said wherever the policy is shown
        policy = {**policy, "weights": f"the parent's ({parent.model_id}), before AdaBN"}
    return save_derived(config.output, parent, model.state_dict(), step, threshold=parent.threshold, threshold_policy=policy)


def adapt_labelled(parent: ModelDir, sample: SiteSample, site: str, config: AdaptConfig) -> Path:
    """Fine-tune a copy of the parent on part of the patients; threshold and temperature from the rest."""
    assert sample.labels is not None
    fit, held_out = holdout_split(sample, config.holdout_fraction, config.seed)
    holdout = SiteSample(
        sample.data, sample.fingerprint, sample.images[held_out], sample.labels[held_out], sample.patients[held_out],
        [sample.content_hashes[index] for index in held_out],
    )
    parent_logits = parent.predict_logits(holdout.images)
    model = copy.deepcopy(parent.model)
    history = fine_tune(model, sample.images[fit], sample.labels[fit], config)
    logits = ModelDir(path=Path(config.output), model=model, meta=parent.meta).predict_logits(holdout.images)
    step = {
        "step": "adapt-labelled",
        "method": "fine-tuning on part of the labelled sample; threshold and temperature on the held-out patients",
        "site": site,
        **sample.describe(),
        "fine_tuning": {
            "n_images": int(fit.size), "n_patients": int(np.unique(sample.patients[fit]).size),
            "epochs": config.epochs, "learning_rate": config.learning_rate, "batch_size": config.batch_size,
            "augment": config.augment.to_dict(), "seed": config.seed, "history": history,
        },
        "held_out": {
            "n_images": int(held_out.size), "n_patients": int(np.unique(holdout.patients).size),
            "auroc_parent": _auroc_with_ci(holdout.labels, parent_logits, holdout.patients, config),
            "auroc_fine_tuned": _auroc_with_ci(holdout.labels, logits, holdout.patients, config),
        },
        "min_sensitivity": config.min_sensitivity,
        **calibration_record(
            holdout.labels, holdout.patients, logits, config.min_sensitivity, config.folds, config.n_boot, config.seed
        ),
    }
    step["warnings"] = [*earlier_use(parent.meta, step), *sample.patient_warnings(), *step["warnings"]]
    policy = {"rule": THRESHOLD_RULE, "min_sensitivity": config.min_sensitivity, "chosen_on": f"site:{site} (held-out patients)"}
    return save_derived(
        config.output, parent, model.state_dict(), step, threshold=step["threshold"], temperature=step["temperature"], threshold_policy=policy
    )
