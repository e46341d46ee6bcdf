"""`lungray ensemble`: trained model directories (+ test-time augmentation) -> one model directory.

The members' probabilities are averaged (`lungray.models.ensemble`), so the ensemble needs
its own operating threshold: it is chosen on the validation split of the members' training
data by the same rule as in training, and recorded with the validation metrics. The result
is a model directory like any other, which `evaluate`, `compare` and `screen` accept.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from lungray.evaluate import check_preprocessing, score_split
from lungray.ingest import load_summary
from lungray.io.base import normalized_record
from lungray.modeldir import ModelDir, load_model_dir, read_meta, save_model_dir
from lungray.models import Ensemble, EnsembleConfig, count_parameters
from lungray.train.export import operating_point, versions
from lungray.train.trainer import TrainConfig


def build_ensemble_dir(
    member_dirs: Sequence[str | os.PathLike[str]],
    data: str,
    output: str | os.PathLike[str],
    tta: str = "none",
    min_sensitivity: float = TrainConfig.min_sensitivity,
) -> Path:
    """Write the ensemble of `member_dirs` to `output`, its threshold chosen on `data`'s val split.

    The members must have been trained on `data` (so all on its preprocessing): validation
    images that a member trained on would make the threshold optimistic.
    """
    if not member_dirs:
        raise ValueError("an ensemble needs at least one model directory")
    members = [load_model_dir(path) for path in member_dirs]
    preprocess = members[0].meta["preprocess"]
    summary = load_summary(data)
    for member in members:
        check_preprocessing(member, summary, data)
        if member.meta.get("data_fingerprint") != summary["fingerprint"]:
            raise ValueError(f"{member.path} was trained on other data than {data}; its val split would not be held out")
        if member.meta.get("temperature", 1.0) != 1.0:  # the ensemble averages its members' raw softmax
            raise ValueError(
                f"{member.path} is calibrated (temperature {member.meta['temperature']}), which an ensemble would drop: "
                "ensemble the models it was calibrated from, then calibrate the ensemble"
            )
        if member.meta.get("lineage"):  # a report could no longer tell which site's films it was fitted on
            steps = ", ".join(step["step"] for step in member.meta["lineage"])
            raise ValueError(
                f"{member.path} is derived for a site ({steps}), which the ensemble's record would lose: "
                "ensemble the home models, then adapt or calibrate the ensemble"
            )
    config = EnsembleConfig(members=tuple(member.meta["architecture"] for member in members), tta=tta)
    network = Ensemble([member.model for member in members], tta=tta).eval()
    provisional = ModelDir(path=Path(output), model=network, meta={"preprocess": preprocess, "threshold": 0.5})
    val_label, val_prob = score_split(provisional, data, "val")
    meta = {
        "architecture": config.to_dict(),
        "preprocess": preprocess,
        "decode": normalized_record(summary.get("decode")),  # the members' too: check_preprocessing compared them
        **operating_point(val_label, val_prob, min_sensitivity),
        "members": [
            {"model_id": member.model_id, "source": str(member.path), "val_metrics": member.meta.get("val_metrics")}
            for member in members
        ],
        "data_fingerprint": summary["fingerprint"],
        "versions": versions(),
        "wall_time_s": sum(member.meta.get("wall_time_s") or 0.0 for member in members),
        "n_parameters": count_parameters(network),
    }
    return save_model_dir(output, network.state_dict(), meta)






def summarize(model_dir: Path) -> dict[str, object]:
    """What the CLI prints: where the ensemble is and how it does on validation."""
    meta = read_meta(model_dir)
    return {"model_dir": str(model_dir), "model_id": meta["model_id"], "threshold": meta["threshold"], "val_metrics": meta["val_metrics"]}
