"""Unlabelled site adaptation, the shipped method and the alternatives it was measured against; prints JSON.

    python bench/site_unlabelled.py MODEL_DIR [MODEL_DIR ...] --site out/site-b [--n-boot 2000]

For each model, on every film of the site's ingest: the parent as it is (the baseline) and
  adabn      `lungray adapt --unlabelled` (lungray.site.adapt.adapt_batchnorm);
  bn_mix     half the parent's BatchNorm statistics, half AdaBN's (a prior on the source
             statistics, as Schneider et al. 2020 use against corruption shift);
  tent       TENT (Wang et al. 2021): one epoch of Adam (1e-3, batches of 32) on the BatchNorm
             scales and shifts, minimising the entropy of the predictions, statistics kept;
  tent_x5    the same with 3 epochs at 5e-3 (a stronger step);
  pseudo     self-training: 2 epochs of `adapt --labelled`'s fine-tune (1e-4, the training
             augmentation) on the parent's own calls at its threshold, of every film.
Each is scored by its site AUROC and the paired, patient-bootstrap difference to the parent.
The site's labels are read to measure only: no method sees them. In-sample by construction,
as `adapt --unlabelled` is meant to be used (tonight's films adapt tonight's model).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lungray.evaluate import check_preprocessing  # noqa: E402
from lungray.ingest import load_summary  # noqa: E402
from lungray.metrics import paired_bootstrap_auroc, roc_auc_score  # noqa: E402
from lungray.modeldir import ModelDir, load_model_dir, model_input  # noqa: E402
from lungray.site.adapt import AdaptConfig, adapt_batchnorm, batchnorm_layers, fine_tune  # noqa: E402
from lungray.site.data import read_ingest_rows  # noqa: E402
from lungray.split import patient_array  # noqa: E402


def log_odds(model_dir: ModelDir, images: np.ndarray) -> np.ndarray:
    logits = model_dir.predict_logits(images)
    return logits[:, 1] - logits[:, 0]


def adabn(model: nn.Module, images: np.ndarray) -> nn.Module:
    adapt_batchnorm(model, images)
    return model


def bn_mix(model: nn.Module, images: np.ndarray) -> nn.Module:
    adapted = adabn(copy.deepcopy(model), images)
    for mixed, target in zip(batchnorm_layers(model), batchnorm_layers(adapted)):
        mixed.running_mean.mul_(0.5).add_(0.5 * target.running_mean)
        mixed.running_var.mul_(0.5).add_(0.5 * target.running_var)
    return model


def tent(model: nn.Module, images: np.ndarray, epochs: int = 1, learning_rate: float = 1e-3, batch_size: int = 32) -> nn.Module:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    affine = [p for layer in batchnorm_layers(model) for p in (layer.weight, layer.bias)]
    for parameter in affine:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(affine, lr=learning_rate)
    generator = torch.Generator().manual_seed(0)
    model.eval()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator).numpy()
        for start in range(0, len(order), batch_size):
            logits = model(model_input(images[order[start : start + batch_size]])).float()
            entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
            optimizer.zero_grad(set_to_none=True)
            entropy.backward()
            optimizer.step()
    return model


def pseudo_labels(model: nn.Module, images: np.ndarray, parent: ModelDir) -> nn.Module:
    calls = (replace(parent, model=model).predict_proba(images) >= parent.threshold).astype(np.int64)
    fine_tune(model, images, calls, AdaptConfig(model_dir="", data="", output="", labelled=True, epochs=2))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--site", required=True, help="the site's ingest (labelled, to measure)")
    parser.add_argument("--n-boot", type=int, default=2000)
    args = parser.parse_args()
    torch.manual_seed(0)
    summary = load_summary(args.site)
    table = read_ingest_rows(args.site, ["image", "label", "patient_key"], labelled_only=True)
    images = table["image"].combine_chunks().to_numpy()
    labels = table["label"].to_numpy().astype(np.int64)
    patients = patient_array(table["patient_key"].to_pylist(), table["path"].to_pylist())
    results = []
    for path in args.models:
        parent = load_model_dir(path)
        check_preprocessing(parent, summary, args.site)
        methods: dict[str, Callable[[nn.Module], nn.Module]] = {
            "adabn": lambda m: adabn(m, images),
            "bn_mix": lambda m: bn_mix(m, images),
            "tent": lambda m: tent(m, images),
            "tent_x5": lambda m: tent(m, images, epochs=3, learning_rate=5e-3),
            "pseudo": lambda m: pseudo_labels(m, images, parent),
        }
        baseline = log_odds(parent, images)
        result: dict[str, object] = {"model": path, "model_id": parent.meta["model_id"], "n_images": int(labels.size),
                                     "parent_auroc": round(float(roc_auc_score(labels, baseline)), 4), "methods": {}}
        for name, method in methods.items():
            started = time.process_time()
            scores = log_odds(replace(parent, model=method(copy.deepcopy(parent.model))), images)
            paired = paired_bootstrap_auroc(labels, scores, baseline, groups=patients, n_boot=args.n_boot)
            result["methods"][name] = {
                "auroc": round(paired["auroc_a"], 4),
                "minus_parent": round(paired["difference"], 4),
                "ci": [round(paired["ci_low"], 4), round(paired["ci_high"], 4)],
                "p_value": round(paired["p_value"], 4),
                "cpu_s": round(time.process_time() - started, 1),
            }
        results.append(result)
        print(json.dumps(result), file=sys.stderr, flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
