"""`lungray adapt`: BatchNorm statistics re-estimated on a site's films (no labels), and fine-tuning (labels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_modeldir import make_model_dir
from test_site_calibrate import SIZE, site_arrays, write_site_sample

from lungray.cli import build_parser, main
from lungray.modeldir import load_model_dir, read_meta
from lungray.site.adapt import AdaptConfig, adapt, adapt_batchnorm, holdout_split
from lungray.site.data import read_site_sample

torch.set_num_threads(1)


def channel_stats(activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance over (N, H, W), computed by torch directly."""
    per_channel = activations.double().permute(1, 0, 2, 3).flatten(1)
    return per_channel.mean(dim=1), per_channel.var(dim=1, unbiased=True)


@pytest.mark.parametrize("arch", ["cnn", "cnn_lstm"])
def test_adabn_sets_each_batchnorm_to_its_inputs_statistics_on_the_site(tmp_path: Path, arch: str) -> None:
    model = load_model_dir(make_model_dir(tmp_path / "m", arch=arch, size=SIZE)).model
    site = np.random.default_rng(3).integers(120, 256, size=(21, SIZE, SIZE), dtype=np.uint8)  # brighter than [0,1] noise
    before = model.trunk.layers[1].running_mean.clone()
    assert adapt_batchnorm(model, site, batch_size=8) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    inputs = torch.from_numpy(site).float().div(255).unsqueeze(1)
    layers = model.trunk.layers
    with torch.no_grad():
        first_mean, first_var = channel_stats(layers[0](inputs))  # the stem conv: what the first BN sees
        second_mean, second_var = channel_stats(layers[:4](inputs))  # through the adapted first BN (eval mode) and conv 2
    torch.testing.assert_close(layers[1].running_mean.double(), first_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layers[1].running_var.double(), first_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layers[4].running_mean.double(), second_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layers[4].running_var.double(), second_var, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(before, layers[1].running_mean)
    with torch.no_grad():  # in eval mode, the first BN now whitens the site's stem output
        normalised = (layers[0](inputs) - layers[1].running_mean.view(1, -1, 1, 1)) / (layers[1].running_var.view(1, -1, 1, 1) + layers[1].eps).sqrt()
    assert abs(float(normalised.mean())) < 1e-4 and not model.training


def test_adapt_unlabelled_reads_no_label_and_changes_only_batchnorm_statistics(tmp_path: Path) -> None:
    data = write_site_sample(tmp_path / "night", n_normal=8, n_abnormal=8, labelled=False)
    parent_dir = make_model_dir(tmp_path / "parent", size=SIZE, threshold=0.37)
    code = main(["adapt", str(parent_dir), "--data", str(data), "--output", str(tmp_path / "adapted"), "--unlabelled", "--site", "B"])
    assert code == 0
    parent, adapted = load_model_dir(parent_dir), load_model_dir(tmp_path / "adapted")
    assert adapted.threshold == 0.37 and adapted.model_id != parent.model_id
    parent_state, adapted_state = parent.model.state_dict(), adapted.model.state_dict()
    for name, tensor in parent_state.items():
        is_statistic = name.endswith(("running_mean", "running_var", "num_batches_tracked"))
        assert torch.equal(tensor, adapted_state[name]) != (is_statistic and not name.endswith("num_batches_tracked")), name
    (record,) = read_meta(tmp_path / "adapted")["lineage"]
    assert record["step"] == "adapt-unlabelled" and record["labels_used"] is False and record["site"] == "B"
    assert record["parent_model_id"] == parent.model_id and record["n_images"] == 16 and "n_abnormal" not in record
    images, _, _ = site_arrays(data)
    expected = load_model_dir(parent_dir).model
    adapt_batchnorm(expected, images)
    with torch.no_grad():
        reference = torch.softmax(expected(torch.from_numpy(images).float().div(255).unsqueeze(1)), 1)[:, 1].numpy()
    np.testing.assert_allclose(adapted.predict_proba(images), reference, rtol=1e-4, atol=1e-6)


def test_adapt_labelled_fine_tunes_on_patients_it_does_not_threshold_on(tmp_path: Path) -> None:
    data = write_site_sample(tmp_path / "site", n_normal=40, n_abnormal=40)
    parent_dir = make_model_dir(tmp_path / "parent", size=SIZE)
    step = adapt(AdaptConfig(model_dir=str(parent_dir), data=str(data), output=str(tmp_path / "tuned"), labelled=True, epochs=2, batch_size=16, n_boot=20, folds=3))
    parent, tuned = load_model_dir(parent_dir), load_model_dir(tmp_path / "tuned")
    assert not torch.equal(parent.model.state_dict()["head.4.weight"], tuned.model.state_dict()["head.4.weight"])
    (record,) = read_meta(tmp_path / "tuned")["lineage"]
    assert record["step"] == "adapt-labelled" and record["labels_used"] is True and record == {k: step[k] for k in record}
    assert record["fine_tuning"]["n_images"] + record["held_out"]["n_images"] == 80
    assert len(record["fine_tuning"]["history"]) == 2 and record["cross_validation"]["n"] == record["held_out"]["n_images"]
    assert tuned.threshold == record["threshold"] and tuned.temperature == record["temperature"]

    sample = read_site_sample(str(data), parent, labelled=True)
    fit, held_out = holdout_split(sample, 0.3, seed=0)
    assert set(sample.patients[fit]).isdisjoint(sample.patients[held_out])
    assert held_out.size == record["held_out"]["n_images"] and 0.25 < held_out.size / 80 < 0.4
    assert set(sample.labels[held_out]) == {0, 1}


@pytest.mark.parametrize("fraction, share", [(0.3, 1 / 3), (0.5, 1 / 2), (0.8, 4 / 5), (0.9, 9 / 10)])
def test_the_hold_out_is_the_share_asked_for_as_near_as_whole_folds_give(tmp_path: Path, fraction: float, share: float) -> None:
    """0.6, 0.8 and 0.9 all held out a half (one fold of two)."""
    data = write_site_sample(tmp_path / "site", n_normal=50, n_abnormal=50, images_per_patient=1)
    sample = read_site_sample(str(data), load_model_dir(make_model_dir(tmp_path / "parent", size=SIZE)), labelled=True)
    fit, held_out = holdout_split(sample, fraction, seed=0)
    assert held_out.size / 100 == pytest.approx(share, abs=0.02) and fit.size + held_out.size == 100
    assert set(sample.patients[fit]).isdisjoint(sample.patients[held_out])


def test_a_step_after_one_that_used_the_same_films_says_its_figures_are_in_sample(tmp_path: Path) -> None:
    """calibrate after adapt --labelled on the same site: the calibration's cross-validation
    covered all 80 films, 56 of which the weights were fine-tuned on, without a word. After
    AdaBN (no labels) its statistics came from every held-out fold. Both are said now; a
    calibration on other films of the site is not warned of."""
    from lungray.site.calibrate import CalibrateConfig, calibrate

    data = write_site_sample(tmp_path / "site", n_normal=40, n_abnormal=40)
    parent_dir = make_model_dir(tmp_path / "parent", size=SIZE)
    adapt(AdaptConfig(model_dir=str(parent_dir), data=str(data), output=str(tmp_path / "tuned"), labelled=True, epochs=1, batch_size=16, n_boot=20, folds=3))
    adapt(AdaptConfig(model_dir=str(parent_dir), data=str(data), output=str(tmp_path / "adabn"), labelled=False))
    other = write_site_sample(tmp_path / "other-films", n_normal=20, n_abnormal=20, seed=9)
    warned = {}
    for name, data_used in (("tuned", data), ("adabn", data), ("tuned-other", other)):
        parent = tmp_path / name.removesuffix("-other")
        step = calibrate(CalibrateConfig(model_dir=str(parent), data=str(data_used), output=str(tmp_path / f"{name}-calibrated"), n_boot=20, folds=3))
        warned[name] = [warning for warning in step["warnings"] if "were used" in warning]
    assert warned["tuned"] == ["80 of these 80 distinct films were used with their labels by the parent's adapt-labelled step (site site): "
                               "the figures measured here are in-sample for what it fitted"]
    (adabn,) = warned["adabn"]
    assert adabn.startswith("80 of these 80 distinct films were used without labels by the parent's adapt-unlabelled step")
    assert warned["tuned-other"] == []


def test_adabn_after_calibrate_says_the_kept_threshold_was_chosen_for_the_parent(tmp_path: Path) -> None:
    """AdaBN keeps the parent's threshold and temperature. A site-calibrated parent's were chosen
    for a sensitivity on the parent's probabilities, which AdaBN moves: said in the step's
    warnings and in the threshold policy. A parent thresholded on val alone gets no warning."""
    from lungray.report.render import threshold_note
    from lungray.site.calibrate import CalibrateConfig, calibrate

    data = write_site_sample(tmp_path / "site", n_normal=30, n_abnormal=30)
    parent_dir = make_model_dir(tmp_path / "parent", size=SIZE)
    calibrate(CalibrateConfig(model_dir=str(parent_dir), data=str(data), output=str(tmp_path / "calibrated"), n_boot=20, folds=3))
    calibrated = load_model_dir(tmp_path / "calibrated")
    step = adapt(AdaptConfig(model_dir=str(tmp_path / "calibrated"), data=str(data), output=str(tmp_path / "adabn"), labelled=False))
    (warning,) = step["warnings"]
    assert warning.startswith(f"the threshold {calibrated.threshold:.4g} and temperature {calibrated.temperature:.4g} kept from the parent's calibrate step")
    adapted = read_meta(tmp_path / "adabn")
    assert adapted["threshold"] == calibrated.threshold and adapted["temperature"] == calibrated.temperature
    assert adapted["threshold_policy"] == {**calibrated.meta["threshold_policy"], "weights": f"the parent's ({calibrated.model_id}), before AdaBN"}
    note = threshold_note({"name": "cnn", "threshold": adapted["threshold"], "threshold_policy": adapted["threshold_policy"]})
    assert note.endswith(f"weights the parent's ({calibrated.model_id}), before AdaBN).")
    assert adapt(AdaptConfig(model_dir=str(parent_dir), data=str(data), output=str(tmp_path / "plain-adabn"), labelled=False))["warnings"] == []


def test_a_film_stored_twice_is_counted_once_on_both_sides_of_the_warning() -> None:
    """Site B holds two byte-identical pairs: "239 of these 241 images" when all 239 distinct films were used."""
    from lungray.site.lineage import earlier_use

    parent = {"lineage": [{"step": "calibrate", "site": "B", "labels_used": True, "film_keys": ["a", "b", "c"]}]}
    (warning,) = earlier_use(parent, {"n_images": 4, "film_keys": ["a", "b", "c"]})
    assert warning.startswith("3 of these 3 distinct films were used with their labels")


def test_adapt_needs_exactly_one_mode_and_labels_for_fine_tuning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for modes in ([], ["--labelled", "--unlabelled"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["adapt", "m", "--data", "d", "--output", "o", *modes])
    data = write_site_sample(tmp_path / "night", n_normal=4, n_abnormal=4, labelled=False)
    parent = make_model_dir(tmp_path / "parent", size=SIZE)
    assert main(["adapt", str(parent), "--data", str(data), "--output", str(tmp_path / "o"), "--labelled"]) == 2
    assert "no labelled images" in capsys.readouterr().err


def test_an_ingest_of_no_usable_file_and_bad_settings_are_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An ingest that found no usable file writes no data/: "error: .../data" was all it said.
    `--min-sensitivity 1.5` failed only after every epoch of fine-tuning."""
    import shutil

    data = write_site_sample(tmp_path / "site", n_normal=4, n_abnormal=4)
    parent = make_model_dir(tmp_path / "parent", size=SIZE)
    shutil.rmtree(data / "data")
    for arguments in (
        ["calibrate", str(parent), "--data", str(data), "--output", str(tmp_path / "calibrated")],
        ["adapt", str(parent), "--data", str(data), "--output", str(tmp_path / "adapted"), "--unlabelled"],
        ["evaluate", str(parent), str(data)],
    ):
        assert main(arguments) == 2
        assert f"{data} holds no usable images (its ingest found" in capsys.readouterr().err
    for setting in ({"min_sensitivity": 1.5}, {"folds": 1}, {"n_boot": 0}):
        with pytest.raises(ValueError, match=next(iter(setting))):
            AdaptConfig(model_dir="m", data="d", output="o", labelled=True, **setting)
