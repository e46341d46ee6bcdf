"""model.json of a directory derived from another for a site: the parent's record plus one lineage step.

Each step says what was done (`step`), to which model (`parent_model_id`), for which site,
on what data (path, fingerprint, image/patient/class counts: no patient key, no file
name) and whether labels were used. Steps accumulate: `adapt --unlabelled` then
`calibrate` leaves two. The weights' training record (architecture, preprocessing,
history, versions) is kept; the parent's operating point is not, since the step replaces
it or, without labels, keeps it under its own name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lungray.modeldir import FORMAT_KEYS, META_FILE, ModelDir, read_meta, save_model_dir

#: Parent fields that describe the parent's operating point, not the derived model's.
PARENT_OPERATING_POINT = ("threshold_policy", "val_metrics")


FILM_KEY_CHARS = 16  # 64 bits of the stored tensor's SHA-256: no collision among a site's films


def film_keys(content_hashes: Sequence[str]) -> list[str]:
    """The distinct films of `content_hashes` (ingest rows' content_hash), as short keys, sorted."""
    return sorted({content_hash[:FILM_KEY_CHARS] for content_hash in content_hashes})


def images_fitted_on(step: Mapping[str, Any], content_hashes: Sequence[str]) -> int | None:
    """How many of the images with `content_hashes` a lineage step used; None for a step
    recorded before `film_keys` (its ingest's fingerprint is all there is to match)."""
    if step.get("film_keys") is None:
        return None
    fitted = set(step["film_keys"])
    return sum(content_hash[:FILM_KEY_CHARS] in fitted for content_hash in content_hashes)


def site_name(site: str | None, data: str) -> str:
    """The site's name as given, or the ingest folder's name."""
    return site or Path(str(data).rstrip("/")).name


def check_free(output: str | os.PathLike[str]) -> None:
    """Refuse an `output` that already holds a model directory: a derived one never overwrites."""
    if (Path(output) / META_FILE).exists():
        raise FileExistsError(f"{output} already holds a model directory; choose another output")


def save_derived(
    output: str | os.PathLike[str],
    parent: ModelDir,
    state_dict: Mapping[str, torch.Tensor],
    step: Mapping[str, Any],
    **fields: Any,
) -> Path:
    """Write the derived model directory: the parent's meta, `fields` over it, `step` appended to its lineage."""
    check_free(output)
    inherited = {key: value for key, value in parent.meta.items() if key not in FORMAT_KEYS and key not in PARENT_OPERATING_POINT}
    record = {"parent_model_id": parent.model_id, **step}
    meta = {**inherited, **fields, "lineage": [*parent.meta.get("lineage", []), record]}
    return save_model_dir(output, state_dict, meta)


def fitted_on(step: Mapping[str, Any], content_hashes: Sequence[str], fingerprint: str) -> bool:
    """Whether a lineage step used any of the images with `content_hashes` (of the ingest with
    `fingerprint`): its figures on them are in-sample. A step recorded before `film_keys` is
    matched by its ingest's fingerprint."""
    used = images_fitted_on(step, content_hashes)
    return step.get("data_fingerprint") == fingerprint if used is None else used > 0


def earlier_use(parent_meta: Mapping[str, Any], sample_record: Mapping[str, Any]) -> list[str]:
    """Warnings for this step's record: earlier steps of the parent's lineage that used films of
    this sample (by `film_keys`, or an equal fingerprint for steps recorded before them). A
    step that saw their labels fitted weights or a threshold on them, so the figures measured
    here on those films, cross-validated or not, are in-sample for it."""
    keys = set(sample_record.get("film_keys") or [])
    n_films = len(keys) if keys else sample_record["n_images"]  # distinct films: byte-identical copies are one
    warnings = []
    for step in parent_meta.get("lineage", []):
        if step.get("film_keys") is not None:
            used = len(keys & set(step["film_keys"]))
        else:
            used = n_films if step.get("data_fingerprint") == sample_record.get("data_fingerprint") else 0
        if not used:
            continue
        if step.get("labels_used"):
            warnings.append(
                f"{used} of these {n_films} distinct films were used with their labels by the parent's "
                f"{step['step']} step (site {step.get('site')}): the figures measured here are in-sample for what it fitted"
            )
        else:
            warnings.append(
                f"{used} of these {n_films} distinct films were used without labels by the parent's {step['step']} "
                f"step (site {step.get('site')}): its statistics came from them, so the held-out figures here are not wholly held out"
            )
    return warnings


def kept_operating_point(parent_meta: Mapping[str, Any], step_name: str) -> list[str]:
    """A warning for a step that changes the weights' outputs but keeps the parent's threshold and
    temperature: where a labelled site step chose them, its sensitivity and specificity were
    measured on the parent's probabilities and no longer describe the derived model."""
    chosen_by = [step["step"] for step in parent_meta.get("lineage", []) if step.get("labels_used")]
    if not chosen_by:
        return []
    return [
        f"the threshold {parent_meta['threshold']:.4g} and temperature {parent_meta.get('temperature', 1.0):.4g} kept from the "
        f"parent's {chosen_by[-1]} step were chosen on its probabilities, which {step_name} changes: that step's sensitivity "
        "and specificity do not describe this model; run calibrate on a labelled sample to choose them again"
    ]


def written_step(output: str | os.PathLike[str]) -> dict[str, Any]:
    """What calibrate and adapt print: the directory, its model id and the lineage step as model.json holds it."""
    meta = read_meta(output)
    return {"model_dir": str(output), "model_id": meta["model_id"], **meta["lineage"][-1]}
