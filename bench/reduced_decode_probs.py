"""What reduced-resolution decoding does to a trained model's probabilities; prints JSON.

    python bench/reduced_decode_probs.py MODEL_DIR [MODEL_DIR ...] [--films 24] [--side 2048]
        [--floors WAVELET:DCT:BINNING ...] [--storages uncompressed,png16,...]

Full-size twins of real films (tests/film_factory.py: each of `films` films of kermany-site-b,
evenly spaced, upsampled to `side` px, 12 bit, with detector noise) are stored in every
storage of film_factory.STORAGES and scored by each model through a reduced decode and
through a full-resolution decode of the same bytes (`decode_bytes` without `reduced`, then
the same `preprocess`). The reduced decode is the rows' own (`rows.process_file`, floors from
`lungray.io.base.reduced_decode_for`) and, for each `--floors`, one with those floors given
as multiples of the model's input side (e.g. 4:4:2). Both decode with this lungray's default
options, whatever a model recorded: the question is this decoder's reduced against its full
path. The issue's bar: every probability within 0.02. `cpu_ms_median` is the reduced decode
plus preprocessing of one film (CPU time, median over films).

A lossy storage whose lossless twin is among `--storages` (J2K lossy: the same 12-bit values
uncompressed) also gets `against_lossless`: how far the full and the reduced decode of the
lossy file each move the probability from the full decode of the film before compression,
which says which of the two paths keeps closer to the film itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
from film_factory import STORAGES, stored_as, synthetic_film  # noqa: E402

from lungray.io.base import ReducedDecode  # noqa: E402
from lungray.io.decode import DecodeOptions, decode_bytes  # noqa: E402
from lungray.io.rows import process_file  # noqa: E402
from lungray.modeldir import load_model_dir  # noqa: E402
from lungray.preprocess import PreprocessConfig, preprocess  # noqa: E402

SITE_B = ROOT.parent / "shared" / "data" / "kermany-site-b"
RULE = "rows"  # the rows' own floors
# Lossy storage -> the storage holding the same values losslessly (same bits, same header).
LOSSLESS_TWIN = {"j2k_lossy": "uncompressed"}


def reduced_path(floors: str, config: PreprocessConfig) -> Callable[[Path], tuple[np.ndarray, str]]:
    """(tensor, decoder) of a file through the reduced decode named by `floors` (RULE or W:D:B)."""
    if floors == RULE:

        def rows(path: Path) -> tuple[np.ndarray, str]:
            row, tensor = process_file(str(path), path.name, path.stat().st_size, config, DecodeOptions(), 1 << 31, scope=None, salt=None)
            if tensor is None:
                raise RuntimeError(f"{path.name}: {row['error']}")
            return tensor, str(row["decoder"])

        return rows
    wavelet, dct, binning = (int(part) * config.size for part in floors.split(":"))
    options = DecodeOptions(reduced=ReducedDecode(wavelet=wavelet, dct=dct, binning=binning))

    def given(path: Path) -> tuple[np.ndarray, str]:
        decoded = decode_bytes(path.read_bytes(), path.name, options)
        if not decoded.ok:
            raise RuntimeError(f"{path.name}: {decoded.error}")
        return preprocess(decoded.image, config, decoded.mask), str(decoded.meta["decoder"])

    return given


def against_lossless(original: np.ndarray, full: np.ndarray, reduced: np.ndarray) -> dict[str, object]:
    """How far the full and the reduced decode of lossy files move each probability from the
    lossless original's, and on how many films the reduced one stays closer."""
    full_moves, reduced_moves = np.abs(full - original), np.abs(reduced - original)
    return {
        "full_max_abs_dprob": round(float(full_moves.max()), 4),
        "full_median_abs_dprob": round(float(np.median(full_moves)), 4),
        "reduced_max_abs_dprob": round(float(reduced_moves.max()), 4),
        "reduced_median_abs_dprob": round(float(np.median(reduced_moves)), 4),
        "films_reduced_closer": int((reduced_moves < full_moves).sum()),
        "films_full_closer": int((full_moves < reduced_moves).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dirs", nargs="+")
    parser.add_argument("--films", type=int, default=24)
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--floors", action="append", default=[], help="WAVELET:DCT:BINNING multiples of the model side (repeatable)")
    parser.add_argument("--storages", default=",".join(STORAGES), help="comma-separated film_factory.STORAGES")
    args = parser.parse_args()

    everything = sorted(SITE_B.rglob("*.jpeg"))
    if not everything:
        raise SystemExit(f"no site-B films under {SITE_B}")
    sources = everything[:: max(1, len(everything) // args.films)][: args.films]
    models = [load_model_dir(path) for path in args.model_dirs]
    configs = list(dict.fromkeys(model.preprocess for model in models))
    variants = [RULE, *args.floors]
    storages = args.storages.split(",")
    # (variant, preprocess config, storage) -> tensors, decoders, CPU ms; variant None: the full resolution
    tensors: dict[tuple[str | None, PreprocessConfig, str], list[np.ndarray]] = {}
    decoders: dict[tuple[str, PreprocessConfig, str], set[str]] = {}
    cpu_ms: dict[tuple[str, PreprocessConfig, str], list[float]] = {}
    paths = {(variant, config): reduced_path(variant, config) for variant in variants for config in configs}
    with tempfile.TemporaryDirectory() as folder:
        for index, source in enumerate(sources):
            film = synthetic_film(side=args.side, seed=index, source=source)
            for storage in storages:
                path = Path(folder) / f"film{storage}"
                path.write_bytes(stored_as(film, storage))
                full = decode_bytes(path.read_bytes(), path.name, DecodeOptions())
                if not full.ok:
                    raise RuntimeError(f"{storage}: {full.error}")
                for config in configs:
                    tensors.setdefault((None, config, storage), []).append(preprocess(full.image, config, full.mask))
                    for variant in variants:
                        started = time.process_time()
                        tensor, decoder = paths[variant, config](path)
                        cpu_ms.setdefault((variant, config, storage), []).append(1000 * (time.process_time() - started))
                        tensors.setdefault((variant, config, storage), []).append(tensor)
                        decoders.setdefault((variant, config, storage), set()).add(decoder)
    results = []
    for model in models:
        config = model.preprocess
        by_variant = {}
        for variant in variants:
            per_storage = {}
            for storage in storages:
                full_probs = model.predict_proba(np.stack(tensors[None, config, storage]))
                moves = np.abs(model.predict_proba(np.stack(tensors[variant, config, storage])) - full_probs)
                per_storage[storage] = {
                    "decoder": sorted(decoders[variant, config, storage]),
                    "max_abs_dprob": round(float(moves.max()), 4),
                    "median_abs_dprob": round(float(np.median(moves)), 4),
                    "cpu_ms_median": round(float(np.median(cpu_ms[variant, config, storage])), 1),
                }
                twin = LOSSLESS_TWIN.get(storage)
                if twin in storages:
                    original = model.predict_proba(np.stack(tensors[None, config, twin]))
                    per_storage[storage]["against_lossless"] = against_lossless(
                        original, full_probs, model.predict_proba(np.stack(tensors[variant, config, storage]))
                    )
            worst = max(entry["max_abs_dprob"] for entry in per_storage.values())
            by_variant[variant] = {"max_abs_dprob": worst, "within_0.02": worst <= 0.02, "storages": per_storage}
        results.append({"model_id": model.model_id, "films": len(sources), "side": args.side, "floors": by_variant})
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
