"""What reduced-resolution decoding does to a trained model's probabilities; prints JSON.

    python bench/reduced_decode_probs.py MODEL_DIR [MODEL_DIR ...] [--films 24] [--side 2048]

Full-size twins of real films (tests/film_factory.py: each of the first `films` films of
kermany-site-b upsampled to `side` px, 12 bit, with detector noise) are stored in every
storage of film_factory.STORAGES and scored twice by each model: through the rows' own
decode (`rows.process_file`, which decodes no smaller than twice the model's input where the
codec allows) and through a full-resolution decode of the same bytes (`decode_bytes` without
`min_side`, then the same `preprocess`). The issue's bar: every probability within 0.02.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
from film_factory import STORAGES, stored_as, synthetic_film  # noqa: E402

from lungray.io.decode import decode_bytes  # noqa: E402
from lungray.io.rows import process_file  # noqa: E402
from lungray.modeldir import load_model_dir  # noqa: E402
from lungray.preprocess import preprocess  # noqa: E402

SITE_B = ROOT.parent / "shared" / "data" / "kermany-site-b"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dirs", nargs="+")
    parser.add_argument("--films", type=int, default=24)
    parser.add_argument("--side", type=int, default=2048)
    args = parser.parse_args()

    sources = sorted(SITE_B.rglob("*.jpeg"))[:: max(1, len(sorted(SITE_B.rglob("*.jpeg"))) // args.films)][: args.films]
    models = [load_model_dir(path) for path in args.model_dirs]
    reduced: dict[str, list[list[np.ndarray]]] = {storage: [[] for _ in models] for storage in STORAGES}
    full: dict[str, list[list[np.ndarray]]] = {storage: [[] for _ in models] for storage in STORAGES}
    decoders: dict[str, set[str]] = {storage: set() for storage in STORAGES}
    with tempfile.TemporaryDirectory() as folder:
        for index, source in enumerate(sources):
            film = synthetic_film(side=args.side, seed=index, source=source)
            for storage in STORAGES:
                path = Path(folder) / f"film{storage}"
                path.write_bytes(stored_as(film, storage))
                for slot, model in enumerate(models):
                    row, tensor = process_file(
                        str(path), path.name, path.stat().st_size, model.preprocess, model.decode, 1 << 31, scope=None, salt=None
                    )
                    decoded = decode_bytes(path.read_bytes(), path.name, model.decode)
                    if tensor is None or not decoded.ok:
                        raise RuntimeError(f"{storage}: {row.get('error') or decoded.error}")
                    decoders[storage].add(str(row.get("decoder")))
                    reduced[storage][slot].append(tensor)
                    full[storage][slot].append(preprocess(decoded.image, model.preprocess, decoded.mask))
    results = []
    for slot, model in enumerate(models):
        per_storage = {}
        for storage in STORAGES:
            moves = np.abs(model.predict_proba(np.stack(reduced[storage][slot])) - model.predict_proba(np.stack(full[storage][slot])))
            per_storage[storage] = {
                "decoder": sorted(decoders[storage]),
                "max_abs_dprob": float(moves.max()),
                "median_abs_dprob": float(np.median(moves)),
            }
        worst = max(entry["max_abs_dprob"] for entry in per_storage.values())
        results.append({"model_id": model.model_id, "films": len(sources), "side": args.side, "max_abs_dprob": worst,
                        "within_0.02": worst <= 0.02, "storages": per_storage})
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
