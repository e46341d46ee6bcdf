"""How far a model's probability moves when a film is acquired or displayed differently.

Each perturbation is a plausible difference between sites, applied to the decoded [0,1]
film BEFORE the model's own preprocessing (`lungray.preprocess.preprocess` with the
model directory's PreprocessConfig), since the percentile stretch and the resize are part
of what a model sees and may absorb or amplify the change:

- border: a black frame of 5% of each side (collimation, another detector's active area);
- sigmoid_window: the film as 12-bit stored values, windowed by pydicom's
  `apply_windowing` over the full range with VOI LUT Function SIGMOID instead of LINEAR
  (a legitimate display choice of another vendor); its baseline is the LINEAR window,
  so only the window function differs;
- gamma_0.7 / gamma_1.4: a different tone curve (film ** gamma);
- crop: 5% cut off each side and resized back to the film's size (other framing).

For each, |p(perturbed) - p(baseline)| per film: maximum, median and mean, overall and by
label, and how many calls flip at the model's threshold. `identity` is the measure's own
zero: the same film scored twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_windowing

from lungray.evaluate import check_preprocessing
from lungray.ingest import SourceSpec, list_sources, load_summary
from lungray.io.base import reduced_decode_for
from lungray.io.decode import DecodeOptions, decode_bytes
from lungray.io.listing import exists, join_uri, read_bytes
from lungray.metrics import predict_labels
from lungray.modeldir import load_model_dir
from lungray.preprocess import preprocess, to_float
from lungray.site.data import read_ingest_rows

BORDER_FRACTION = 0.05
CROP_FRACTION = 0.05
STORED_BITS = 12
LABEL_NAMES = {0: "normal", 1: "abnormal", None: "unlabelled"}


def black_border(film: np.ndarray, fraction: float = BORDER_FRACTION) -> np.ndarray:
    """The film with `fraction` of its height (width) blacked out at the top and bottom (left and right)."""
    rows, cols = film.shape
    top, side = round(fraction * rows), round(fraction * cols)
    framed = film.copy()
    framed[:top], framed[rows - top :], framed[:, :side], framed[:, cols - side :] = 0.0, 0.0, 0.0, 0.0
    return framed


def windowed(film: np.ndarray, function: str) -> np.ndarray:
    """The film stored as 12-bit values and windowed over their full range by pydicom (LINEAR or SIGMOID), back in [0,1]."""
    full_scale = 2**STORED_BITS - 1
    stored = np.rint(np.clip(film, 0.0, 1.0) * full_scale).astype(np.uint16)
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation = 16, STORED_BITS, 0
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = full_scale / 2, full_scale + 1, function
    return (apply_windowing(stored, ds).astype(np.float64) / full_scale).clip(0.0, 1.0).astype(np.float32)


def gamma_curve(film: np.ndarray, gamma: float) -> np.ndarray:
    return np.power(np.clip(film, 0.0, 1.0), gamma, dtype=np.float32)


def centre_crop(film: np.ndarray, fraction: float = CROP_FRACTION) -> np.ndarray:
    """`fraction` cut off each side, resized back (bilinear) to the film's shape."""
    rows, cols = film.shape
    top, side = round(fraction * rows), round(fraction * cols)
    inner = np.ascontiguousarray(film[top : rows - top, side : cols - side], dtype=np.float32)
    return np.asarray(Image.fromarray(inner, mode="F").resize((cols, rows), Image.Resampling.BILINEAR), dtype=np.float32)


def as_decoded(film: np.ndarray) -> np.ndarray:
    return film


def linear_window(film: np.ndarray) -> np.ndarray:
    return windowed(film, "LINEAR")


def cropped_mask(mask: np.ndarray) -> np.ndarray:
    """A padding mask cropped and resized as `centre_crop` crops and resizes the film."""
    return centre_crop(mask.astype(np.float32)) > 0.5


@dataclass(frozen=True)
class Perturbation:
    """A change to the film, the version of the film it is compared with (scored once per
    distinct baseline), and what the change does to the decoder's padding mask (geometry
    moves it; a tone curve or a black frame of the detector's does not)."""

    change: Callable[[np.ndarray], np.ndarray]
    baseline: Callable[[np.ndarray], np.ndarray] = as_decoded
    mask_change: Callable[[np.ndarray], np.ndarray] = as_decoded


PERTURBATIONS: dict[str, Perturbation] = {
    "identity": Perturbation(as_decoded),
    "border": Perturbation(black_border),
    "sigmoid_window": Perturbation(lambda film: windowed(film, "SIGMOID"), baseline=linear_window),
    "gamma_0.7": Perturbation(lambda film: gamma_curve(film, 0.7)),
    "gamma_1.4": Perturbation(lambda film: gamma_curve(film, 1.4)),
    "crop": Perturbation(centre_crop, mask_change=cropped_mask),
}


def movement_summary(moves: np.ndarray, flips: np.ndarray) -> dict[str, Any]:
    """max / median / mean of |dprob| and the calls that flip; NaN-free: empty groups give n = 0 only."""
    if moves.size == 0:
        return {"n": 0}
    return {
        "n": int(moves.size),
        "max_abs_dprob": float(moves.max()),
        "median_abs_dprob": float(np.median(moves)),
        "mean_abs_dprob": float(moves.mean()),
        "calls_flipped": int(flips.sum()),
    }


def folder_films(
    input_uri: str, dataset: str | None, labels: str | None, options: DecodeOptions, model_side: int, errors: Counter[str]
) -> Iterator[tuple[np.ndarray, np.ndarray | None, int | None]]:
    """(decoded film, its padding mask, label) of every file under `input_uri`, decoded as
    screening decodes (`rows.process_file`: the model's options, the reduced decode for its
    input side, the mask the preprocessing takes); failures counted in `errors`."""
    options = replace(options, reduced=reduced_decode_for(model_side))
    for item in list_sources((SourceSpec(uri=input_uri, dataset=dataset, labels=labels),), salt=None):
        decoded = decode_bytes(read_bytes(item.entry.uri), item.entry.relpath, options)
        if decoded.ok:
            yield decoded.image, decoded.mask, item.label
        else:
            errors[decoded.error or "unknown error"] += 1


def ingested_films(data: str) -> Iterator[tuple[np.ndarray, np.ndarray | None, int | None]]:
    """(stored image as [0,1] float, no mask, label) of every row of an ingest: films already preprocessed once."""
    table = read_ingest_rows(data, ["image", "label"])
    for stored, label in zip(table["image"].combine_chunks().to_numpy(), table["label"].to_pylist()):
        yield to_float(stored), None, label


def measure_invariance(
    model_dir: str, input_uri: str, dataset: str | None = None, labels: str | None = None, batch_size: int = 64
) -> dict[str, Any]:
    """The invariance report of the module docstring for every film under `input_uri` (as JSON-ready dict).

    `input_uri` is a folder of films (labelled by `dataset` / `labels` as for ingest), or an
    ingest (its summary.json present), whose stored images stand in for the films: their
    perturbations then act on the already preprocessed image, which the report says.
    Files that do not decode are counted by reason, never silently dropped; no file name
    or patient key appears in the report.
    """
    model = load_model_dir(model_dir)
    config = model.preprocess
    ingested = exists(join_uri(input_uri, "summary.json"))
    if ingested:  # stored images of another preprocessing or decoder would not be what the model scores
        check_preprocessing(model, load_summary(input_uri), input_uri)
    errors: Counter[str] = Counter()
    films = ingested_films(input_uri) if ingested else folder_films(input_uri, dataset, labels, model.decode, config.size, errors)
    views: dict[str, list[np.ndarray]] = {name: [] for name in PERTURBATIONS}
    baselines = {perturbation.baseline: [] for perturbation in PERTURBATIONS.values()}
    film_labels: list[int | None] = []
    for film, mask, label in films:
        for name, perturbation in PERTURBATIONS.items():
            views[name].append(preprocess(perturbation.change(film), config, None if mask is None else perturbation.mask_change(mask)))
        for baseline, stored in baselines.items():
            stored.append(preprocess(baseline(film), config, mask))
        film_labels.append(label)
    if not film_labels:
        raise ValueError(f"no film under {input_uri} could be decoded ({dict(errors)})")
    label_array = np.array([LABEL_NAMES[label] for label in film_labels])
    report: dict[str, Any] = {
        "model_id": model.model_id,
        "threshold": model.threshold,
        "input": "ingest: stored (preprocessed) images perturbed" if ingested else "films: decoded files perturbed",
        "n_films": len(film_labels),
        "films_by_label": dict(Counter(label_array.tolist())),
        "files_not_decoded": sum(errors.values()),
        "not_decoded_by_reason": dict(errors),
        "border_fraction": BORDER_FRACTION,
        "crop_fraction": CROP_FRACTION,
        "perturbations": {},
    }
    reference_probs = {baseline: model.predict_proba(np.stack(stored), batch_size=batch_size) for baseline, stored in baselines.items()}
    for name, perturbation in PERTURBATIONS.items():
        changed = model.predict_proba(np.stack(views[name]), batch_size=batch_size)
        reference = reference_probs[perturbation.baseline]
        moves = np.abs(changed - reference)
        flips = predict_labels(changed, model.threshold) != predict_labels(reference, model.threshold)
        report["perturbations"][name] = {
            **movement_summary(moves, flips),
            "by_label": {label: movement_summary(moves[label_array == label], flips[label_array == label]) for label in sorted(set(label_array))},
        }
    return report
