"""Decode throughput per core of full-size films, against the bare codec and a naive path in the same run; prints JSON.

    python bench/decode.py [--repeats 5] [--side 2048] [--size 224] [--storages j2k_lossless,jpegls,...]

Files: one generated `side` px 12-bit film (tests/film_factory.py: a real film upsampled,
with detector noise) in every storage of film_factory.STORAGES, and the real samples
(pydicom-data RG1_J2KR.dcm, 1955x1841 J2K lossless; the 1955x1841 J2K lossy and the 1024 px
JPEG baseline CR of shared/data/cxr-dicom-samples). One process, one thread for numpy's
sake; each path is timed `repeats` times, interleaved with the others, and the fastest
time is kept. Every path runs under the malloc thresholds that lungray's decode workers set
(`lungray.io.allocator`), so that the ratios are the codecs' and the pipelines', not the allocator's. The figures and ratios are CPU time of this process (`process_time`): on a
shared VM, wall time also counts the other tenants (kept as `wall_ms`). Paths:
  a. bare codec: pydicom `dcmread` + `pixel_array` (Pillow's full decode for PNG/JPEG files);
  b. naive: (a) -> float64 -> min/max to [0,1] -> full-size area (PIL BOX) resize to `size`;
  c. lungray: `rows.process_file` (read, decode at >= 2 x size where the codec can, preprocess);
  d. lungray at full resolution: `decode_bytes` without `min_side` + `preprocess` (the path
     before lungray.io.codecs), for reference.
Also the candidate codecs alone on each compressed frame (pydicom's plugin, Pillow, and
imagecodecs where installed), which is how lungray.io.codecs picked its decoders.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from film_factory import STORAGES, stored_as, synthetic_film  # noqa: E402
from PIL import Image  # noqa: E402
from pydicom.encaps import get_frame  # noqa: E402
from pydicom.pixels import pixel_array  # noqa: E402

from lungray.io.allocator import keep_freed_memory  # noqa: E402
from lungray.io.decode import DecodeOptions, decode_bytes  # noqa: E402
from lungray.io.rows import process_file  # noqa: E402
from lungray.preprocess import PreprocessConfig, preprocess  # noqa: E402

SAMPLES = ROOT / ".." / "shared" / "data" / "cxr-dicom-samples"
REAL_FILES = {
    "real_RG1_J2KR_1955x1841_j2k_lossless": None,  # from pydicom-data
    "real_RG1_J2KI_1955x1841_j2k_lossy": SAMPLES / "pydicom_RG1_J2KI.dcm",
    "real_siim_1024_jpeg_baseline": SAMPLES / "siim_acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
}
# Storages with a reduced decode (target: c >= 3x faster than b) and without (target: c <= 1.25 a).
REDUCED = ("j2k_lossless", "j2k_lossy", "jpeg_baseline", "jpeg_file")


def bare_decode(path: Path) -> np.ndarray:
    if path.suffix in (".png", ".jpg"):
        with Image.open(path) as image:
            return np.asarray(image)
    return pixel_array(pydicom.dcmread(path))


def naive(path: Path, size: int) -> np.ndarray:
    values = bare_decode(path).astype(np.float64)
    lo, hi = values.min(), values.max()
    unit = (values - lo) / (hi - lo)
    return np.asarray(Image.fromarray(unit.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BOX))


def codec_candidates(path: Path) -> dict[str, Callable[[], object]]:
    """Each codec library alone on the file's first frame (no DICOM parsing, no pipeline)."""
    if path.suffix != ".dcm":
        return {}
    ds = pydicom.dcmread(path)
    syntax = ds.file_meta.TransferSyntaxUID
    if not syntax.is_compressed:
        return {}
    frame = get_frame(ds.PixelData, 0, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1))
    candidates: dict[str, Callable[[], object]] = {"pydicom_default_full": lambda: pixel_array(ds)}

    def pillow(reduce: int = 0) -> np.ndarray:
        image = Image.open(io.BytesIO(frame))
        if reduce:
            image.reduce = reduce
        image.load()
        return np.asarray(image)

    try:
        import imagecodecs
    except ImportError:
        imagecodecs = None
    if syntax.name.startswith("JPEG 2000"):
        candidates["pillow_full"] = pillow
        candidates["pillow_reduce1"] = lambda: pillow(1)
        candidates["pillow_reduce2"] = lambda: pillow(2)
        if imagecodecs:
            candidates["imagecodecs_full"] = lambda: imagecodecs.jpeg2k_decode(frame, numthreads=1)
    elif syntax.name.startswith("JPEG-LS"):
        candidates["pydicom_pyjpegls_full"] = lambda: pixel_array(ds, decoding_plugin="pyjpegls")
        if imagecodecs:
            candidates["imagecodecs_full"] = lambda: imagecodecs.jpegls_decode(frame)
    elif syntax.name.startswith("JPEG Baseline"):
        candidates["pillow_full"] = pillow

        def drafted(scale: int) -> np.ndarray:
            image = Image.open(io.BytesIO(frame))
            image.draft("L", (image.size[0] // scale, image.size[1] // scale))
            return np.asarray(image)

        candidates["pillow_draft_1/2"] = lambda: drafted(2)
        candidates["pillow_draft_1/4"] = lambda: drafted(4)
        if imagecodecs:
            candidates["imagecodecs_full"] = lambda: imagecodecs.jpeg8_decode(frame)
    elif syntax.name.startswith("RLE") and imagecodecs:
        dtype = np.uint16 if int(ds.BitsAllocated) == 16 else np.uint8
        candidates["imagecodecs_full"] = lambda: imagecodecs.dicomrle_decode(frame, dtype)
    return candidates


def fastest(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, float | str]]:
    """Best-of-`repeats` CPU and wall milliseconds of each function, interleaved; a failure is a result."""
    best: dict[str, dict[str, float | str]] = {name: {"cpu": float("inf"), "wall": float("inf")} for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            if "failed" in best[name]:
                continue
            try:
                cpu, wall = time.process_time(), time.perf_counter()
                function()
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            except Exception as exc:  # noqa: BLE001 - e.g. Pillow refusing reduce=2 on a 1841 px side
                best[name] = {"failed": f"{type(exc).__name__}: {exc}"[:120]}
                continue
            best[name]["cpu"] = min(best[name]["cpu"], cpu * 1000)
            best[name]["wall"] = min(best[name]["wall"], wall * 1000)
    return {name: {key: value if isinstance(value, str) else round(value, 1) for key, value in times.items()} for name, times in best.items()}


def bench_file(path: Path, config: PreprocessConfig, repeats: int) -> dict[str, object]:
    data = path.read_bytes()
    full_options = DecodeOptions()
    row, _ = process_file(str(path), path.name, len(data), config, full_options, 1 << 31, scope=None, salt=None)
    if row["status"] != "ok":
        return {"error": row["error"]}
    paths = {
        "a_bare_codec": lambda: bare_decode(path),
        "b_naive": lambda: naive(path, config.size),
        "c_lungray": lambda: process_file(str(path), path.name, len(data), config, full_options, 1 << 31, scope=None, salt=None),
        "d_lungray_full_resolution": lambda: preprocess(decode_bytes(path.read_bytes(), path.name, full_options).image, config),
    }
    times = fastest(paths, repeats)
    cpu = {name: value["cpu"] for name, value in times.items()}
    result: dict[str, object] = {
        "rows_x_cols": f"{row['rows']}x{row['cols']}",
        "bytes": len(data),
        "decoder": row["decoder"],
        "decode_reduce": row["decode_reduce"],
        "cpu_ms": cpu,
        "wall_ms": {name: value["wall"] for name, value in times.items()},
        "files_per_s_per_core": {name: round(1000 / value, 2) for name, value in cpu.items()},
        "c_speedup_over_b": round(cpu["b_naive"] / cpu["c_lungray"], 2),
        "c_over_a": round(cpu["c_lungray"] / cpu["a_bare_codec"], 2),
        "c_speedup_over_d": round(cpu["d_lungray_full_resolution"] / cpu["c_lungray"], 2),
    }
    candidates = codec_candidates(path)
    if candidates:
        result["codec_cpu_ms"] = {name: value.get("cpu", value.get("failed")) for name, value in fastest(candidates, repeats).items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--size", type=int, default=224, help="the model's input side")
    parser.add_argument("--storages", default=",".join(STORAGES), help="comma-separated film_factory.STORAGES")
    args = parser.parse_args()
    config = PreprocessConfig(size=args.size)
    tuned_allocator = keep_freed_memory()
    from pydicom.data import get_testdata_file

    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        film = synthetic_film(args.side)
        for storage in args.storages.split(","):
            path = Path(tmp) / f"{storage}{STORAGES[storage]}"
            path.write_bytes(stored_as(film, storage))
            files[f"generated_{args.side}_{storage}"] = path
        for name, path in REAL_FILES.items():
            files[name] = Path(get_testdata_file("RG1_J2KR.dcm")) if path is None else path
        results = {name: bench_file(path, config, args.repeats) for name, path in files.items()}
    targets = {}
    for name, result in results.items():
        if "error" in result:
            continue
        storage = name.removeprefix(f"generated_{args.side}_")
        if storage in REDUCED or name.startswith("real_"):  # the real samples are all J2K or JPEG
            targets[name] = {"target": "c >= 3x faster than b", "met": result["c_speedup_over_b"] >= 3.0}
        else:
            targets[name] = {"target": "c <= 1.25 x a", "met": result["c_over_a"] <= 1.25}
    print(
        json.dumps(
            {
                "config": {"repeats": args.repeats, "side": args.side, "size": args.size, "cpu_count": os.cpu_count(),
                           "load_average": os.getloadavg(), "tuned_allocator": tuned_allocator},
                "files": results,
                "targets": targets,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
