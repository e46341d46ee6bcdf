"""Where the time goes fetching from a PACS: QIDO paging, WADO-RS transfer and decode, against a local folder.

Starts a loopback Orthanc (tests/pacs_fixtures.py), stores N generated DX images (16-bit,
uncompressed, SIZE x SIZE) in it and in a local folder, then times, in one run:

- local: read each file's bytes + lungray's decode (the baseline, what `screen` does for a folder);
- pacs: one paged QIDO-RS listing, then per instance WADO-RS retrieve + the same decode.

Sequential, single process: it measures the per-image cost of each stage, not the pipeline's
throughput (which Ray's parallel decode tasks set). With `--screen`, also end to end:
`run_screen` (an untrained 224 px CNN) over the folder, then over the Orthanc, then over the
folder again (the folder's figure is the mean of the two, as the machine's speed drifts),
in one local Ray, after an untimed warm-up run (Ray's first dataset starts its workers). Prints one JSON
object; `pacs_speed_over_local` is the PACS's images/s over the folder's (below 1: the PACS is slower).

    python bench/pacs.py --n 100 --size 1024 [--screen]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.uid import DigitalXRayImageStorageForPresentation, generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from dicom_factory import dicom_bytes, dicom_dataset  # noqa: E402
from lungray.io.decode import decode_bytes  # noqa: E402
from lungray.pacs import dicomweb  # noqa: E402
from pacs_fixtures import running_orthanc  # noqa: E402  (sets LUNGRAY_DICOMWEB_USER/PASSWORD before Ray starts)


def generated_files(n: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    files = []
    for index in range(n):
        pixels = rng.integers(0, 4096, (size, size), dtype=np.uint16)
        ds = dicom_dataset(
            pixels, bits_stored=12, StudyInstanceUID=generate_uid(), StudyDate="20260105",
            SOPClassUID=DigitalXRayImageStorageForPresentation, Modality="DX", PatientID=f"BENCH-{index:05d}",
        )
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        files.append(dicom_bytes(ds))
    return files


def screen_rates(folder: Path, pacs_uri: str, root: Path) -> dict[str, object]:
    """End-to-end images/s of `run_screen` over the folder and the PACS (folder timed before and after)."""
    from model_factory import untrained_model_dir

    from lungray.raysession import init_ray
    from lungray.screen.pipeline import ScreenConfig, run_screen

    init_ray(progress_bars=False)
    model = untrained_model_dir(root / "model", size=224)
    runs = {}
    for name, source in (("warm_up", str(folder)), ("local_before", str(folder)), ("pacs", pacs_uri), ("local_after", str(folder))):
        start = time.perf_counter()
        summary = run_screen(ScreenConfig(model=str(model), input=source, output=str(root / f"out-{name}"), throwaway_salt=True))
        assert summary["by_status"]["ok"] == summary["files_listed"], summary["by_status"]
        runs[name] = {"wall_s": round(time.perf_counter() - start, 2), "scoring_images_per_s": summary["images_per_second"]}
    local = (runs["local_before"]["wall_s"] + runs["local_after"]["wall_s"]) / 2
    runs.pop("warm_up")
    return {**runs, "pacs_speed_over_local": round(local / runs["pacs"]["wall_s"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--page-size", type=int, default=50)
    parser.add_argument("--screen", action="store_true", help="also end to end: run_screen over the folder vs the Orthanc")
    args = parser.parse_args()
    files = generated_files(args.n, args.size)
    with tempfile.TemporaryDirectory(prefix="lungray-bench-pacs-") as tmp:
        folder = Path(tmp) / "local"
        folder.mkdir()
        for index, data in enumerate(files):
            (folder / f"{index:05d}.dcm").write_bytes(data)
        with running_orthanc(Path(tmp) / "orthanc") as server:
            for data in files:
                server.upload(data)
            credentials = dicomweb.Credentials(user=server.user, password=server.password)

            start = time.perf_counter()
            local_read = local_decode = 0.0
            for path in sorted(folder.iterdir()):
                t0 = time.perf_counter()
                data = path.read_bytes()
                t1 = time.perf_counter()
                assert decode_bytes(data, path.name).ok
                local_decode += time.perf_counter() - t1
                local_read += t1 - t0
            local_total = time.perf_counter() - start

            start = time.perf_counter()
            records = list(dicomweb.search_instances(server.uri, page_size=args.page_size, modalities=["DX"], credentials=credentials))
            qido = time.perf_counter() - start
            wado = pacs_decode = 0.0
            for record in records:
                t0 = time.perf_counter()
                data = dicomweb.retrieve_instance_bytes(record.path, credentials)
                t1 = time.perf_counter()
                assert decode_bytes(data, record.sop_uid).ok
                pacs_decode += time.perf_counter() - t1
                wado += t1 - t0
            pacs_total = time.perf_counter() - start
            screen = screen_rates(folder, server.uri, Path(tmp)) if args.screen else None
    assert len(records) == args.n
    print(json.dumps({
        "n": args.n,
        "size": args.size,
        "file_mb": round(len(files[0]) / 1e6, 2),
        "local": {"images_per_s": round(args.n / local_total, 1), "read_s": round(local_read, 3), "decode_s": round(local_decode, 3)},
        "pacs": {
            "images_per_s": round(args.n / pacs_total, 1),
            "qido_s": round(qido, 3),
            "qido_pages": -(-args.n // args.page_size) + 1,
            "wado_s": round(wado, 3),
            "decode_s": round(pacs_decode, 3),
        },
        "pacs_speed_over_local": round(local_total / pacs_total, 3),
        "screen": screen,
    }, indent=2))


if __name__ == "__main__":
    main()
