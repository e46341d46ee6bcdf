"""The comparison report: every file, every number recomputable from the predictions, a rendered HTML."""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SAMPLES
from model_factory import untrained_model_dir
from PIL import Image, ImageOps

from lungray.evaluate import labelled_split
from lungray.ingest import IngestConfig, SourceSpec, load_summary, run_ingest
from lungray.metrics import (
    binary_metrics,
    bootstrap_ci,
    calibration_curve_data,
    delong_test,
    mcnemar,
    metrics_with_ci,
    paired_bootstrap_auroc,
    predict_labels,
    sensitivity_at_specificity,
    specificity_at_sensitivity,
)
from lungray.modeldir import ModelDir, load_model_dir, save_model_dir
from lungray.models import Ensemble
from lungray.preprocess import PreprocessConfig
from lungray.cli import add_compare_arguments, compare_config_from_args, strict_json
from lungray.report import compare, plots
from lungray.report.compare import (
    Cases,
    CompareConfig,
    display_names,
    run_compare,
    run_compare_across,
    training_sources,
)
from lungray.report.render import Paragraph, Table, epoch_note, fmt_p, fmt_signed, pair_verdict, threshold_note, to_markdown, training_time

SIZE = 64
N_BOOT = 200
EXAMPLES = 2
ARCHS = ("cnn", "cnn_lstm")
CHROMIUM = Path("/usr/bin/chromium")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    """Module-scoped, so it also holds while the module's fixtures time inference."""
    torch.set_num_threads(1)


def tb_style_source(root: Path, per_label: int) -> None:
    """A second labelled source in the Shenzhen layout: mirrored Kermany images, CHNCXR_NNNN_<label>.png."""
    root.mkdir(parents=True)
    index = 0
    for label, folder in ((0, "NORMAL"), (1, "PNEUMONIA")):
        for path in sorted((SAMPLES / "kermany-mini" / folder).glob("*.jpeg"))[-per_label:]:
            index += 1
            ImageOps.mirror(Image.open(path).convert("L")).save(root / f"CHNCXR_{index:04d}_{label}.png")


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> str:
    """kermany-mini plus a second, Shenzhen-named source, ingested at 64 px."""
    archive = tmp_path_factory.mktemp("archive")
    shutil.copytree(SAMPLES / "kermany-mini", archive / "kermany")
    tb_style_source(archive / "shenzhen", per_label=15)
    output = tmp_path_factory.mktemp("ingested") / "data"
    run_ingest(
        IngestConfig(
            sources=(SourceSpec(str(archive / "kermany"), dataset="kermany"), SourceSpec(str(archive / "shenzhen"), dataset="shenzhen")),
            output=str(output),
            preprocess=PreprocessConfig(size=SIZE),
        )
    )
    return str(output)


def split_images(data: str, split: str = "test") -> dict[str, np.ndarray]:
    """The split's images keyed by path, read independently of the report."""
    images = {}
    for batch in labelled_split(data, split, columns=("image", "path")).iter_batches(batch_format="numpy"):
        images.update(zip(batch["path"], batch["image"]))
    return images


def training_record(fingerprint: str) -> dict[str, Any]:
    """The training keys export writes to model.json, for a made-up three-epoch run on `fingerprint`."""
    history = [
        {"epoch": epoch, "train_loss": 0.7 - 0.1 * epoch, "val_loss": 0.75 - 0.05 * epoch, "val_auroc": (0.6, 0.8, 0.75)[epoch],
         "lr": 1e-3, "seconds": 40.0 + epoch, "images_per_s": 90.0, "peak_rss_mb": 800.0 + epoch}
        for epoch in range(3)
    ]
    return {
        "history": history,
        "data_fingerprint": fingerprint,
        "threshold_policy": {"rule": "highest specificity with sensitivity >= min_sensitivity", "min_sensitivity": 0.95, "chosen_on": "val"},
        "wall_time_s": sum(record["seconds"] for record in history),
        "epochs_trained": 3,
        "best_epoch": 1,
        "selected_epoch": 2,  # the last epoch's weights, exported by default
        "peak_memory_mb": 802.0,
        "hardware": {"workers": 2, "device": "NVIDIA H200", "threads_per_worker": 8, "backend": "nccl"},
    }


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory, ingested: str) -> list[Path]:
    """An untrained CNN (no training record) and an untrained CNN-LSTM carrying a record of training on this ingest.

    Thresholds sit at each model's median test score, so both models call both classes.
    """
    folder = tmp_path_factory.mktemp("models")
    images = np.stack(list(split_images(ingested).values()))
    thresholds = {}
    for arch in ARCHS:
        probe = load_model_dir(untrained_model_dir(folder / f"{arch}-probe", arch, size=SIZE))
        thresholds[arch] = float(np.median(probe.predict_proba(images)))
    cnn = untrained_model_dir(folder / "cnn", "cnn", size=SIZE, threshold=thresholds["cnn"])
    probe = load_model_dir(folder / "cnn_lstm-probe")
    meta = {key: probe.meta[key] for key in ("architecture", "preprocess", "decode")}
    record = training_record(load_summary(ingested)["fingerprint"])
    cnn_lstm = save_model_dir(folder / "cnn_lstm", probe.model.state_dict(), {**meta, "threshold": thresholds["cnn_lstm"], **record})
    return [cnn, cnn_lstm]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, ingested: str, model_dirs: list[Path]) -> tuple[dict[str, Any], Path]:
    output = tmp_path_factory.mktemp("report") / "report"
    config = CompareConfig(
        model_dirs=tuple(str(path) for path in model_dirs), data=ingested, output=str(output),
        n_boot=N_BOOT, gradcam_examples=EXAMPLES,
    )
    return run_compare(config), output


def assert_close(actual: Any, expected: Any, path: str = "") -> None:
    """Nested JSON values equal up to float rounding; NaN expected where metrics.json holds null."""
    if isinstance(expected, dict):
        assert set(actual) == set(expected), path
        for key in expected:
            assert_close(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, f"{path}[{index}]")
    elif isinstance(expected, float) and not math.isfinite(expected):
        assert actual is None, path
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-9, abs=1e-12), path
    else:
        assert actual == expected, path


def by_model(table: Any) -> dict[str, dict[str, np.ndarray]]:
    frame = table.to_pandas()
    return {model_id: {column: rows[column].to_numpy() for column in rows} for model_id, rows in frame.groupby("model_id", sort=False)}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_report_folder_holds_every_file(report: tuple[dict[str, Any], Path]) -> None:
    results, output = report
    assert {path.name for path in output.iterdir()} == {"report.md", "report.html", "metrics.json", "predictions.parquet", "figures"}
    assert json.loads((output / "metrics.json").read_text()) == results
    assert not [path for path in output.parent.iterdir() if path.name.startswith(".")], "staging folder left behind"
    assert set(results["figures"]) == {"roc", "pr", "confusion", "reliability", "training"}
    files = list(results["figures"].values())
    for model in results["models"]:
        assert set(model["gradcam"]) == {"true positive", "false positive", "false negative"}
        assert all(1 <= len(examples) <= EXAMPLES for examples in model["gradcam"].values())
        files += [example["file"] for examples in model["gradcam"].values() for example in examples]
    for relative in files:
        data = (output / relative).read_bytes()
        assert data.startswith(PNG_MAGIC), relative
        assert min(Image.open(io.BytesIO(data)).size) >= SIZE
    written = {path.relative_to(output).as_posix() for path in (output / "figures").rglob("*.png")}
    assert written == set(files)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_predictions_are_the_models_scores(report: tuple[dict[str, Any], Path], ingested: str, model_dirs: list[Path]) -> None:
    _, output = report
    predictions = by_model(pq.read_table(output / "predictions.parquet"))
    images = split_images(ingested)
    for model_dir in model_dirs:
        model = load_model_dir(model_dir)
        rows = predictions[model.model_id]
        assert sorted(rows["path"]) == sorted(images)
        expected = model.predict_proba(np.stack([images[path] for path in rows["path"]]))
        np.testing.assert_allclose(rows["prob"], expected, rtol=1e-6)
        np.testing.assert_array_equal(rows["call"], predict_labels(rows["prob"], model.threshold))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_metrics_match_lungray_metrics_recomputed(report: tuple[dict[str, Any], Path], ingested: str) -> None:
    results, output = report
    predictions = by_model(pq.read_table(output / "predictions.parquet"))
    resampling = {"n_boot": N_BOOT, "seed": 0}

    split = load_summary(ingested)["splits"]["test"]
    any_rows = next(iter(predictions.values()))
    assert results["data"]["n_images"] == split["images"] == len(any_rows["label"])
    assert results["data"]["n_patients"] == split["patients"] == len(set(any_rows["patient_key"]))
    assert results["data"]["n_abnormal"] == split["labels"]["abnormal"] == int(any_rows["label"].sum())

    for model in results["models"]:
        rows = predictions[model["model_id"]]
        y, p, groups = rows["label"], rows["prob"], rows["patient_key"]
        assert_close(model["metrics"], metrics_with_ci(y, p, model["threshold"], groups=groups, **resampling))
        assert model["confusion_matrix"] == binary_metrics(y, p, model["threshold"])["confusion_matrix"]
        assert_close(model["calibration"], calibration_curve_data(y, p))
        for floor in (0.80, 0.90):
            value, low, high = bootstrap_ci(y, p, lambda yy, pp: sensitivity_at_specificity(yy, pp, floor), groups=groups, **resampling)
            assert_close(model["operating_points"][f"sensitivity_at_specificity_{floor:.2f}"], {"value": value, "ci_low": low, "ci_high": high})
        for floor in (0.90, 0.95):
            value, low, high = bootstrap_ci(y, p, lambda yy, pp: specificity_at_sensitivity(yy, pp, floor), groups=groups, **resampling)
            assert_close(model["operating_points"][f"specificity_at_sensitivity_{floor:.2f}"], {"value": value, "ci_low": low, "ci_high": high})

    thresholds = {model["model_id"]: model["threshold"] for model in results["models"]}
    (pair,) = results["pairs"]
    a, b = predictions[pair["model_a"]], predictions[pair["model_b"]]
    np.testing.assert_array_equal(a["path"], b["path"])
    y, groups = a["label"], a["patient_key"]
    calls_a, calls_b = (predict_labels(rows["prob"], thresholds[key]) for key, rows in ((pair["model_a"], a), (pair["model_b"], b)))
    assert_close(pair["mcnemar"], mcnemar(y, calls_a, calls_b))
    assert_close(pair["delong"], delong_test(y, a["prob"], b["prob"]))
    assert_close(pair["paired_bootstrap_auroc"], paired_bootstrap_auroc(y, a["prob"], b["prob"], groups=groups, **resampling))

    assert set(results["by_source"]) == {"kermany", "shenzhen"}
    for source, part in results["by_source"].items():
        in_source = any_rows["source"] == source
        assert part["n_images"] == int(in_source.sum()) and part["n_abnormal"] == int(any_rows["label"][in_source].sum())
        for model_id, rows in predictions.items():
            mask = rows["source"] == source
            expected = metrics_with_ci(rows["label"][mask], rows["prob"][mask], thresholds[model_id], groups=rows["patient_key"][mask], **resampling)
            assert_close(part["metrics"][model_id], expected)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_efficiency_and_training_sources_come_from_the_model_record(
    report: tuple[dict[str, Any], Path], model_dirs: list[Path], ingested: str
) -> None:
    results, _ = report
    cnn, cnn_lstm = results["models"]
    record = training_record(load_summary(ingested)["fingerprint"])
    assert cnn_lstm["efficiency"]["training_wall_time_s"] == record["wall_time_s"]
    assert cnn_lstm["efficiency"]["epochs_trained"] == record["epochs_trained"]
    assert cnn_lstm["efficiency"]["peak_training_memory_mb"] == record["peak_memory_mb"]
    assert cnn_lstm["efficiency"]["training_hardware"] == record["hardware"]
    assert cnn["efficiency"]["training_hardware"] is None
    assert cnn_lstm["history"] == record["history"]
    assert cnn["efficiency"]["training_wall_time_s"] is None and cnn["history"] == []
    for entry, model_dir in zip(results["models"], model_dirs):
        model = load_model_dir(model_dir)
        assert entry["efficiency"]["n_parameters"] == sum(parameter.numel() for parameter in model.model.parameters())
        assert entry["efficiency"]["inference_images_per_s"] > 0 and entry["efficiency"]["inference_torch_threads"] == 1
    assert cnn_lstm["training_sources"]["sources"] == ["kermany", "shenzhen"]
    assert cnn["training_sources"]["sources"] is None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_markdown_answers_first_and_states_data_and_method(report: tuple[dict[str, Any], Path]) -> None:
    results, output = report
    markdown = (output / "report.md").read_text()
    headings = re.findall(r"^## (.+)$", markdown, flags=re.MULTILINE)
    assert headings[0] == "The answer"
    data = results["data"]
    assert f"{data['n_images']} images from {data['n_patients']} patients, {data['n_abnormal']} abnormal" in markdown
    assert f"{N_BOOT} resamples" in markdown and "resampling patients" in markdown
    assert "92.5%" in markdown and "94.1%" in markdown and "accuracy only" in markdown
    answer = markdown.split("## The answer")[1].split("\n## ")[0]
    assert "CNN-LSTM vs CNN" in answer or "CNN vs CNN-LSTM" in answer
    assert "paired bootstrap p =" in answer and "McNemar p =" in answer
    # the CNN records no training data: the cross-dataset table says so instead of guessing
    assert "| CNN | unknown |" in markdown and "records neither training sources nor a data fingerprint" in markdown
    assert re.search(r"^\| CNN-LSTM \| kermany \+ shenzhen \| [^|]+\(in-domain\) \| [^|]+\(in-domain\) \|$", markdown, flags=re.MULTILINE)
    assert "chosen on the val split" in markdown and "does not record how it was chosen" in markdown
    assert "| 2.0 min (2 x NVIDIA H200, nccl) |" in markdown  # 123 s of epochs, and where they ran
    assert "| 3 (best 2, exported 3) |" in markdown  # the epoch validated best, and the one whose weights the model holds (from 1)
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown):
        assert (output / target).is_file(), target


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_html_is_self_contained_and_renders(report: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    results, output = report
    page = (output / "report.html").read_text()
    assert not re.search(r"<(script|link|iframe)\b", page, flags=re.IGNORECASE)
    assert not re.search(r"(src|href)\s*=\s*\"(?!data:)", page, flags=re.IGNORECASE)
    n_figures = len(results["figures"]) + sum(len(examples) for model in results["models"] for examples in model["gradcam"].values())
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) == n_figures

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install the chromium package to render the report")
    screenshot = tmp_path / "report.png"
    subprocess.run(
        [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}", "--window-size=1200,2000",
            (output / "report.html").resolve().as_uri(),
        ],
        check=True, capture_output=True, timeout=180,
    )
    pixels = np.asarray(Image.open(screenshot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2000, 1200)
    assert (pixels < 200).mean() > 0.02 and pixels.std() > 20, "the rendered report looks blank"


def test_training_sources_come_from_the_record_never_a_guess() -> None:
    summary = {"fingerprint": "f" * 64, "sources": [{"uri": "/a", "dataset": "kermany"}, {"uri": "/b", "dataset": "shenzhen"}]}
    assert training_sources({"training_sources": ["shenzhen"]}, summary)["sources"] == ["shenzhen"]
    assert training_sources({"data_fingerprint": "f" * 64}, summary)["sources"] == ["kermany", "shenzhen"]
    elsewhere = training_sources({"data_fingerprint": "0" * 64}, summary)
    assert elsewhere["sources"] is None and "000000000000 is not this ingest's" in elsewhere["basis"]
    assert training_sources({}, summary)["sources"] is None


def verdict_inputs(difference: float, ci: tuple[float, float]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    def model(name: str, auroc: float) -> dict[str, Any]:
        estimate = {"value": 0.8, "ci_low": 0.7, "ci_high": 0.9, "n_skipped": 0}
        metrics = {key: estimate for key in ("accuracy", "recall", "specificity")}
        return {"name": name, "threshold": 0.5, "metrics": {**metrics, "auroc": {**estimate, "value": auroc}}}

    pair = {
        "model_a": "a", "model_b": "b",
        "paired_bootstrap_auroc": {"difference": difference, "ci_low": ci[0], "ci_high": ci[1], "p_value": 0.01},
        "delong": {"p_value": 0.02},
        "mcnemar": {"b": 7, "c": 3, "p_value": 0.3},
    }
    return pair, {"a": model("CNN", 0.80 + difference), "b": model("CNN-LSTM", 0.80)}


def test_the_answer_names_the_better_model_only_when_the_interval_excludes_zero() -> None:
    clear = pair_verdict(*verdict_inputs(-0.05, (-0.08, -0.02)))
    assert clear.startswith("AUROC 0.800 vs 0.750: CNN-LSTM higher by 0.050 (95% CI +0.020 to +0.080")
    assert "excludes 0: CNN-LSTM ranks" in clear
    assert "CNN-LSTM is right where CNN is wrong on 3 images, the reverse on 7" in clear
    unclear = pair_verdict(*verdict_inputs(0.01, (-0.02, 0.04)))
    assert "CNN higher by 0.010 (95% CI -0.020 to +0.040" in unclear and "cannot be told apart" in unclear


def test_compare_refuses_a_model_trained_on_other_preprocessing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "summary.json").write_text(json.dumps({"preprocess": PreprocessConfig(size=SIZE).to_dict(), "fingerprint": "f" * 64}))
    model = untrained_model_dir(tmp_path / "model", "cnn", size=32)
    with pytest.raises(ValueError, match="preprocessed"):
        run_compare(CompareConfig(model_dirs=(str(model),), data=str(data), output=str(tmp_path / "report")))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        run_compare(CompareConfig(model_dirs=(str(model),), data=str(data), output=str(tmp_path / "busy")))
    assert not (tmp_path / "report").exists()


def test_command_line_builds_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_compare_arguments(parser)
    args = parser.parse_args(["m1", "m2", "--data", "d", "--output", "o", "--split", "val", "--n-boot", "50"])
    assert compare_config_from_args(args) == CompareConfig(
        model_dirs=("m1", "m2"), data="d", output="o", split="val", n_boot=50
    )
    with pytest.raises(ValueError, match="split"):
        CompareConfig(model_dirs=("m",), data="d", output="o", split="holdout")


def test_display_names_cover_every_architecture_and_tell_repeats_apart(tmp_path: Path) -> None:
    cnn = load_model_dir(untrained_model_dir(tmp_path / "cnn", "cnn", size=32))
    other_cnn = load_model_dir(untrained_model_dir(tmp_path / "cnn2", "cnn", size=32, seed=1))
    lstm = load_model_dir(untrained_model_dir(tmp_path / "lstm", "cnn_lstm", size=32))
    ensemble = ModelDir(tmp_path, Ensemble([cnn.model, lstm.model]), {"architecture": {"arch": "ensemble"}, "model_id": "ensemble-1"})
    assert display_names([cnn, lstm, ensemble]) == ["CNN", "CNN-LSTM", "Ensemble"]
    assert display_names([cnn, other_cnn]) == [f"CNN {cnn.model_id}", f"CNN {other_cnn.model_id}"]


def test_training_time_says_where_the_epochs_ran() -> None:
    assert training_time(None, None) == "not recorded"
    assert training_time(90.0, None) == "1.5 min"
    cpu = {"workers": 2, "device": "CPU", "threads_per_worker": 1, "backend": "gloo"}
    assert training_time(90.0, cpu) == "1.5 min (2 x CPU, 1 thread each, gloo)"
    assert training_time(90.0, {**cpu, "workers": 1, "threads_per_worker": 4, "backend": None}) == "1.5 min (1 x CPU, 4 threads each)"


def test_verdict_numbers_read_as_they_are() -> None:
    """A bound that rounds to zero reads +0.000, a tie reads "equal", and a p-value just under
    alpha is not rounded up to it beside a verdict that the interval excludes 0."""
    tie = pair_verdict(*verdict_inputs(0.0, (-0.0001, 0.02)))
    assert "AUROC 0.800 vs 0.800: equal (95% CI +0.000 to +0.020" in tie and "higher by" not in tie
    assert fmt_signed(-0.0001) == "+0.000" and fmt_signed(-0.0006) == "-0.001"
    for below in (0.04995, 0.0499999, 0.049996, 0.0496):
        assert fmt_p(below) == "< 0.05", below
    assert fmt_p(0.0504) == "0.050" and fmt_p(0.05) == "0.050" and fmt_p(0.0494) == "0.049" and fmt_p(0.0005) == "< 0.001"


def test_a_threshold_says_where_it_was_chosen_in_words() -> None:
    """A site step's threshold read "chosen on the site:B split"."""
    model = {"name": "CNN + calibrate B", "threshold": 0.31, "threshold_policy": {"min_sensitivity": 0.95}}
    for where, said in (
        ("val", "chosen on the val split"),
        ("site:B", "chosen on site B's sample"),
        ("site:B (held-out patients)", "chosen on site B's sample (held-out patients)"),
    ):
        assert f"{said} (min sensitivity 0.95)." in threshold_note({**model, "threshold_policy": {"chosen_on": where, "min_sensitivity": 0.95}})
    assert "chosen on an unrecorded split" in threshold_note(model)


def test_epochs_are_counted_from_one_as_the_training_log_counts_them() -> None:
    """model.json holds 0-based epochs; "15 (best 15)" is the last of 15, as `train` printed it."""
    assert epoch_note(14, 14) == " (best 15)" and epoch_note(1, 2) == " (best 2, exported 3)" and epoch_note(None, None) == ""


def test_a_dollar_in_a_name_is_drawn_as_written() -> None:
    """A model's name carries its site's; `$` would start mathtext, which garbles the legend or,
    with a backslash, raises and loses the whole report."""
    name = r"CNN + calibrate site $\x$ one"
    y, p = np.array([0, 1] * 10), np.linspace(0, 1, 20)
    calibration = calibration_curve_data(y, p)
    history = [{"epoch": 0, "train_loss": 0.5, "val_loss": 0.6, "val_auroc": 0.7}]
    for figure in (
        plots.roc_figure(y, {name: p}), plots.pr_figure(y, {name: p}), plots.confusion_figure({name: [[5, 5], [5, 5]]}),
        plots.reliability_figure({name: calibration}), plots.training_figure({name: history}),
    ):
        assert plots.png_bytes(figure).startswith(PNG_MAGIC)
        texts = [text.get_text() for text in figure.findobj(lambda artist: hasattr(artist, "get_text"))]
        assert any(name in text.replace(r"\$", "$") for text in texts)


def test_markdown_keeps_names_from_opening_html_tags() -> None:
    markdown = to_markdown([Paragraph('<img src=x onerror=alert(1)> p < 0.05'), Table(("site",), (("<b>|x",),))])
    assert not re.search(r"(?<!\\)<(img|b)", markdown) and r"\<img src" in markdown and "p < 0.05" in markdown and r"\<b>\|x" in markdown


@pytest.fixture
def fake_split(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[str, Cases]:
    """run_compare without Ray: a 20-image split with made-up scores and paths carrying a name."""
    model = untrained_model_dir(tmp_path / "cnn", "cnn", size=SIZE)
    meta = load_model_dir(model).meta
    n = 20
    cases = Cases(
        images=np.random.default_rng(0).integers(0, 256, (n, SIZE, SIZE), dtype=np.uint8),
        labels=np.array([0, 1] * (n // 2)), patients=np.array([f"p{i}" for i in range(n)], dtype=object),
        sources=np.array(["kermany"] * n), paths=np.array([f"/archive/DOE_JANE_{i}/film.png" for i in range(n)]),
        content_hashes=np.array([f"{i:064x}" for i in range(n)]),
    )
    scores = np.linspace(0.05, 0.95, n)
    monkeypatch.setattr(compare, "read_cases", lambda data, split: cases)
    monkeypatch.setattr(compare, "load_summary", lambda data: {"fingerprint": "f" * 64, "preprocess": meta["preprocess"], "decode": meta["decode"]})
    monkeypatch.setattr(compare, "timed_scores", lambda model, images, batch_size: (scores, 100.0))
    return str(model), cases


def test_a_report_names_its_examples_by_content_and_is_readable_like_its_folder(fake_split: tuple[str, Cases], tmp_path: Path) -> None:
    model, cases = fake_split
    output = tmp_path / "report"
    results = run_compare(CompareConfig(model_dirs=(model,), data="d", output=str(output), n_boot=20, gradcam_examples=1))
    examples = [example for kinds in results["models"][0]["gradcam"].values() for example in kinds]
    assert examples and all(example["content_hash"] in set(cases.content_hashes) and "path" not in example for example in examples)
    assert "DOE_JANE" not in (output / "metrics.json").read_text()
    (tmp_path / "plain").mkdir()
    assert output.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


def test_no_examples_asked_for_is_not_no_cases(fake_split: tuple[str, Cases], tmp_path: Path) -> None:
    model, _ = fake_split
    results = run_compare(CompareConfig(model_dirs=(model,), data="d", output=str(tmp_path / "report"), n_boot=20, gradcam_examples=0))
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert results["models"][0]["gradcam"] == {}
    assert "none in this split" not in markdown and "None drawn: the report was made with --gradcam-examples 0." in markdown


def test_dot_as_output_is_refused_before_scoring_and_dot_as_data_is_its_folder(
    fake_split: tuple[str, Cases], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--output .` would be renamed from under the shell that ran it: refused before any
    scoring, with what to do. `--data .` / `--data ..` name their folders' reports."""
    model, _ = fake_split
    here = tmp_path / "site-b" / "work"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    scored = []
    monkeypatch.setattr(compare, "timed_scores", lambda model, images, batch_size: scored.append(1) or (np.linspace(0.05, 0.95, 20), 100.0))
    for output in (".", "..", str(here)):
        with pytest.raises(ValueError, match="working directory .* a folder of its own"):
            run_compare(CompareConfig(model_dirs=(model,), data="d", output=output, n_boot=20, gradcam_examples=0))
    (here / "afile.html").write_text("mine")
    with pytest.raises(FileExistsError, match="afile.html is a file; choose another output"):
        run_compare(CompareConfig(model_dirs=(model,), data="d", output="afile.html", n_boot=20, gradcam_examples=0))
    assert not scored
    summary = run_compare_across(CompareConfig(model_dirs=(model,), data="d", output="across", n_boot=20, gradcam_examples=0), [".", ".."])
    assert set(summary["data_sets"]) == {"work", "site-b"}
    assert (here / "across" / "work" / "report.md").is_file() and (here / "across" / "site-b" / "report.md").is_file()


def test_printed_json_is_strict() -> None:
    """`lungray evaluate` on a one-class split has no AUROC: null, which jq reads, not NaN."""
    assert json.loads(strict_json({"auroc": float("nan"), "recall": np.float64("nan"), "n": [1, float("inf")]})) == {"auroc": None, "recall": None, "n": [1, None]}


def test_a_report_that_fails_part_way_leaves_nothing_behind(
    fake_split: tuple[str, Cases], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure in the second data set of `compare --data A --data B` leaves neither the first
    data set's report nor a staging folder: the whole folder appears at once or not at all."""
    model, _ = fake_split
    monkeypatch.chdir(tmp_path)
    written = []

    def write_report_then_fail(results: dict[str, Any], folder: Path) -> None:
        written.append(folder)
        if len(written) == 2:
            raise OSError("disk full")
        (folder / "report.md").write_text("whole")

    monkeypatch.setattr(compare, "write_report", write_report_then_fail)
    with pytest.raises(OSError, match="disk full"):
        run_compare_across(CompareConfig(model_dirs=(model,), data="d", output="out/across", n_boot=20, gradcam_examples=0), ["a/x", "b/y"])
    assert len(written) == 2
    assert list((tmp_path / "out").iterdir()) == []
    summary = run_compare_across(CompareConfig(model_dirs=(model,), data="d", output="out/across", n_boot=20, gradcam_examples=0), ["a/x"])
    assert set(summary["data_sets"]) == {"x"} and (tmp_path / "out" / "across" / "x" / "report.md").read_text() == "whole"
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["across"]
