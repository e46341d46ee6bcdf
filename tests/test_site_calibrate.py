"""`lungray calibrate`: the site's threshold and temperature, their lineage, and the sample checks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from model_factory import TODAYS_DECODE
from ray.data.extensions import ArrowTensorArray
from scipy.special import softmax
from sklearn.metrics import log_loss, roc_auc_score
from test_modeldir import TINY, make_model_dir
from test_train import synthetic_images

from lungray.cli import main
from lungray.modeldir import load_model_dir, read_meta, save_model_dir
from lungray.models import build_model
from lungray.preprocess import PreprocessConfig
from lungray.site.calibrate import CalibrateConfig, abnormal_needed, calibrate, patient_folds, sample_warnings
from lungray.site.temperature import fit_temperature

torch.set_num_threads(1)

SIZE = 32


def write_site_sample(
    root: Path, n_normal: int, n_abnormal: int, images_per_patient: int = 2, size: int = SIZE, seed: int = 0,
    labelled: bool = True,
) -> Path:
    """A site's ingest: data/*.parquet over two splits (the site sample must ignore them) and summary.json.

    Patients hold `images_per_patient` images of one class; `labelled=False` writes null labels.
    """
    rng = np.random.default_rng(seed)
    labels = [0] * n_normal + [1] * n_abnormal
    patients = [f"site-patient-{index // images_per_patient}-{label}" for index, label in enumerate(labels)]
    paths = [f"site/{index:04d}.png" for index in range(len(labels))]
    (root / "data").mkdir(parents=True)
    images = synthetic_images(labels, size, rng)
    table = pa.table(
        {
            "image": ArrowTensorArray.from_numpy(images),
            "content_hash": pa.array([hashlib.sha256(image.tobytes()).hexdigest()[:32] for image in images]),  # as rows.process_file
            "label": pa.array(labels if labelled else [None] * len(labels), pa.int8()),
            "split": pa.array(["train" if index % 3 else "test" for index in range(len(labels))]),
            "patient_key": pa.array(patients),
            "study_id": pa.array(patients),
            "source": pa.array(["site"] * len(labels)),
            "path": pa.array(paths),
        }
    )
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), root / "data" / "part-0.parquet")
    pq.write_table(table.slice(half), root / "data" / "part-1.parquet")
    summary = {
        "preprocess": PreprocessConfig(size=size).to_dict(),
        "decode": TODAYS_DECODE,
        "fingerprint": hashlib.sha256("\n".join(paths).encode()).hexdigest(),
    }
    (root / "summary.json").write_text(json.dumps(summary))
    return root


def trained_model_dir(path: Path, size: int = SIZE, arch: str = "cnn", steps: int = 10) -> Path:
    """A tiny model trained in a plain torch loop on other synthetic films, so its logits carry signal."""
    torch.manual_seed(0)
    rng = np.random.default_rng(99)
    labels = np.array([0, 1] * 32)
    images = torch.from_numpy(synthetic_images(labels.tolist(), size, rng)).float().div(255).unsqueeze(1)
    model = build_model(TINY[arch])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        chosen = torch.from_numpy(np.random.default_rng(step).choice(len(labels), 16, replace=False))
        loss = torch.nn.functional.cross_entropy(model(images[chosen]), torch.from_numpy(labels)[chosen])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    meta = {"architecture": TINY[arch].to_dict(), "preprocess": PreprocessConfig(size=size).to_dict(), "threshold": 0.5, "decode": TODAYS_DECODE}
    return save_model_dir(path, model.eval().state_dict(), meta)


def centred_model_dir(path: Path, parent: Path, images: np.ndarray, scale: float) -> Path:
    """`parent` with its last layer rewritten so the logit difference on `images` has median 0 and spread `scale`.

    Temperature scaling corrects confidence, not bias: centring gives the fit an interior
    optimum, and `scale` > 1 makes the model over-confident, as a new site does.
    """
    model = load_model_dir(parent)
    logits = model.predict_logits(images).astype(np.float64)
    difference = logits[:, 1] - logits[:, 0]
    median, scale = float(np.median(difference)), scale / float(difference.std())
    state = {name: tensor.clone() for name, tensor in model.model.state_dict().items()}
    weight, bias = state["head.4.weight"], state["head.4.bias"]
    state["head.4.weight"] = torch.stack([torch.zeros_like(weight[0]), scale * (weight[1] - weight[0])])
    state["head.4.bias"] = torch.tensor([0.0, scale * (float(bias[1] - bias[0]) - median)])
    meta = {key: model.meta[key] for key in ("architecture", "preprocess", "threshold", "decode")}
    return save_model_dir(path, state, meta)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_model_dir(tmp_path_factory.mktemp("trained") / "cnn")


def site_arrays(data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels (-1 when null), patients) of every row in path order, read independently of lungray."""
    table = pq.read_table(data / "data").sort_by("path")
    return table["image"].combine_chunks().to_numpy(), table["label"].fill_null(-1).to_numpy().astype(np.int64), np.array(table["patient_key"].to_pylist())


def brute_force_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature of least log loss (scikit-learn's) on a fine log grid."""
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 4001))
    losses = [log_loss(labels, softmax(logits / t, axis=1), labels=[0, 1]) for t in grid]
    return float(grid[int(np.argmin(losses))])


def best_specificity(labels: np.ndarray, prob: np.ndarray, target: float) -> float:
    """Highest specificity of any threshold keeping sensitivity >= target, by trying every score as threshold."""
    best = 0.0
    for threshold in np.unique(np.append(prob, np.inf)):
        calls = prob >= threshold
        if calls[labels == 1].mean() >= target:
            best = max(best, float((~calls[labels == 0]).mean()))
    return best


def test_temperature_matches_a_brute_force_minimum_of_sklearn_log_loss() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    honest = np.stack([np.zeros(400), (2 * labels - 1) * 1.2 + rng.normal(0, 1.5, 400)], axis=1)
    for scale in (0.5, 1.0, 4.0):  # under-, well- and over-confident logits
        logits = honest * scale
        fitted = fit_temperature(logits, labels)
        assert fitted == pytest.approx(brute_force_temperature(logits, labels), rel=2e-3)
    assert fit_temperature(honest * 4.0, labels) > 2.0  # an over-confident model is cooled


def test_calibrate_writes_a_model_dir_with_its_threshold_temperature_and_lineage(tmp_path: Path, trained: Path) -> None:
    data = write_site_sample(tmp_path / "site-b", n_normal=30, n_abnormal=30)
    images, labels, _ = site_arrays(data)
    parent_dir = centred_model_dir(tmp_path / "parent", trained, images, scale=4.0)
    step = calibrate(CalibrateConfig(model_dir=str(parent_dir), data=str(data), output=str(tmp_path / "calibrated"), min_sensitivity=0.9, n_boot=50))

    parent, derived = load_model_dir(parent_dir), load_model_dir(tmp_path / "calibrated")
    logits = parent.predict_logits(images).astype(np.float64)
    assert 0.6 < roc_auc_score(labels, logits[:, 1] - logits[:, 0])  # the logits carry signal: T is finite
    assert derived.temperature == pytest.approx(brute_force_temperature(logits, labels), rel=2e-3)
    prob = derived.predict_proba(images)
    np.testing.assert_allclose(prob, softmax(logits / derived.temperature, axis=1)[:, 1], rtol=1e-5, atol=1e-6)
    calls = prob >= derived.threshold
    assert calls[labels == 1].mean() >= 0.9
    assert (~calls[labels == 0]).mean() == pytest.approx(best_specificity(labels, prob, 0.9))
    ci = step["threshold_ci"]
    assert ci["ci_low"] <= derived.threshold <= ci["ci_high"]

    meta = read_meta(tmp_path / "calibrated")
    assert meta["weights_sha256"] == parent.meta["weights_sha256"] and meta["model_id"] != parent.model_id
    (record,) = meta["lineage"]
    assert record["step"] == "calibrate" and record["parent_model_id"] == parent.model_id and record["site"] == "site-b"
    assert record["labels_used"] is True and record["n_images"] == 60 and record["n_patients"] == 30
    assert (record["n_abnormal"], record["n_normal"]) == (30, 30) and record["data"] == str(data)
    assert meta["threshold_policy"]["chosen_on"] == "site:site-b" and "val_metrics" not in meta
    cv = record["cross_validation"]
    assert cv["tp"] + cv["fn"] == 30 and cv["tn"] + cv["fp"] == 30 and len(cv["per_fold"]) == 5
    assert cv["recall"]["value"] == cv["tp"] / 30 and cv["specificity"]["value"] == cv["tn"] / 30
    assert sum(fold["n_images"] for fold in cv["per_fold"]) == 60
    assert record["warnings"] == []  # 30 abnormal films can show 0.9 (0.05 ** (1/30) = 0.905)


def test_patient_folds_never_split_a_patient_and_keep_both_classes_to_fit_on() -> None:
    labels = np.array([0, 0, 1, 1] * 10)
    patients = np.array([f"p{index // 2}" for index in range(40)])
    pairs = patient_folds(labels, patients, folds=5, seed=0)
    held = np.concatenate([held_out for _, held_out in pairs])
    assert sorted(held) == list(range(40))
    for fit, held_out in pairs:
        assert set(patients[fit]).isdisjoint(patients[held_out]) and set(labels[fit]) == {0, 1}


def test_too_small_sample_warns_with_the_rule_of_three_bound() -> None:
    assert abnormal_needed(0.95) == pytest.approx(np.log(0.05) / np.log(0.95))  # 58.4: 59 abnormal films
    assert sample_warnings(np.array([0] * 80 + [1] * 59), 0.95) == []
    (warning,) = sample_warnings(np.array([0] * 80 + [1] * 58), 0.95)
    assert "58 abnormal" in warning and "59" in warning
    # The bound is the exact one-sided Clopper-Pearson bound with every abnormal film detected.
    from scipy.stats import binomtest

    assert binomtest(59, 59).proportion_ci(0.90, method="exact").low >= 0.95 > binomtest(58, 58).proportion_ci(0.90, method="exact").low


def test_a_target_sensitivity_of_one_is_warned_of_not_a_crash() -> None:
    """--min-sensitivity 1.0 is accepted; no sample can show it (math.ceil(inf) raised OverflowError)."""
    from scipy.stats import binomtest

    (warning,) = sample_warnings(np.array([0] * 80 + [1] * 500), 1.0)
    assert "cannot be shown by any sample" in warning and "500 abnormal" in warning
    assert f"{binomtest(500, 500).proportion_ci(0.90, method='exact').low:.3f}" in warning  # the one-sided 95% bound


def test_cli_calibrate_warns_on_a_small_sample_and_refuses_one_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parent = make_model_dir(tmp_path / "parent", size=SIZE)
    small = write_site_sample(tmp_path / "small", n_normal=12, n_abnormal=12)
    code = main(["calibrate", str(parent), "--data", str(small), "--output", str(tmp_path / "out"), "--site", "B", "--n-boot", "20", "--folds", "3"])
    captured = capsys.readouterr()
    assert code == 0 and "warning: the sample holds 12 abnormal images" in captured.err
    printed = json.loads(captured.out)
    assert printed["site"] == "B" and printed["cross_validation"]["folds"] == 3 and printed["warnings"]
    assert read_meta(tmp_path / "out")["lineage"][0]["warnings"] == printed["warnings"]

    again = main(["calibrate", str(parent), "--data", str(small), "--output", str(tmp_path / "out")])
    assert again == 2 and "already holds a model directory" in capsys.readouterr().err

    one_class = write_site_sample(tmp_path / "normals", n_normal=10, n_abnormal=0)
    code = main(["calibrate", str(parent), "--data", str(one_class), "--output", str(tmp_path / "refused")])
    assert code == 2 and "all normal" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_a_sample_without_patient_ids_is_warned_of(tmp_path: Path) -> None:
    """Site B through its own labels.csv (path,label,subtype) has no patient column: each film was
    its own patient in the folds and the bootstrap, without a word."""
    data = write_site_sample(tmp_path / "site", n_normal=20, n_abnormal=20)
    for part in (data / "data").glob("*.parquet"):
        table = pq.read_table(part)
        pq.write_table(table.set_column(table.schema.get_field_index("patient_key"), "patient_key", pa.nulls(table.num_rows, pa.string())), part)
    parent = make_model_dir(tmp_path / "parent", size=SIZE)
    step = calibrate(CalibrateConfig(model_dir=str(parent), data=str(data), output=str(tmp_path / "calibrated"), n_boot=20, folds=3))
    assert [warning for warning in step["warnings"] if "no patient id" in warning] == [
        "40 of the 40 images have no patient id, so each counts as its own patient: one patient's films may fall in different "
        "folds and the intervals are too narrow; ingest with an adapter that reads patients (e.g. --dataset kermany) or a "
        "labels CSV with a patient column"
    ]
    with_ids = calibrate(CalibrateConfig(model_dir=str(parent), data=str(write_site_sample(tmp_path / "ids", n_normal=20, n_abnormal=20)),
                                         output=str(tmp_path / "calibrated-ids"), n_boot=20, folds=3))
    assert not [warning for warning in with_ids["warnings"] if "no patient id" in warning]


def test_refuses_a_sample_preprocessed_otherwise(tmp_path: Path) -> None:
    parent = make_model_dir(tmp_path / "parent", size=2 * SIZE)
    data = write_site_sample(tmp_path / "site", n_normal=4, n_abnormal=4)
    with pytest.raises(ValueError, match="preprocessed"):
        calibrate(CalibrateConfig(model_dir=str(parent), data=str(data), output=str(tmp_path / "out")))
