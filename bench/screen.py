"""Screening throughput and memory, against a plain PyTorch baseline in the same run; prints JSON.

    python bench/screen.py [--files N] [--size 224] [--scale 4] [--batch-size 32] [--stage-images M] [--full-size]

1. end to end: N generated files (half 16-bit DICOM, half 8-bit PNG, 512x512; with
   `--full-size`, 2048 px 12-bit films in turn in every storage of tests/film_factory.py:
   uncompressed, RLE, J2K lossless and lossy, JPEG-LS, JPEG baseline DICOM, PNG 16, JPEG) scored by
   `run_screen` (its first run in a fresh Ray, and its second) vs a plain script (torch
   DataLoader, 2 workers, the same decode (with `--full-size`, at full resolution where lungray
   reduces it: that ratio holds the decode's gain too), preprocessing and model). lungray scores with
   BatchNorm folded into the convolutions (`lungray.models.fold`); the plain script runs
   the model as trained on one torch thread (as before 2026-12-02), once more with the
   fold, which separates what the pipeline adds from what the fold adds, and once on
   torch's default threads (a plain script's, two here like lungray's CPU actor);
2. inference stage alone on pre-decoded uint8 tensors: the Ray Data actor stage
   (`Predictor`) vs the bare (folded) model over the same array;
3. peak memory (all Ray processes + driver, sampled) for N and scale x N files, in runs of
   their own: the sampler's reads of /proc are not in the timed runs.

The plain script (as trained) and the bare model are each timed before and after lungray's
runs, and lungray is compared with their mean: the speed of a shared machine drifts (by a
third within minutes on the 2-core VM of docs/results.md), and one timing on one side
would put all of that drift into the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

from proctree import TreeSampler  # noqa: E402 - beside this script

from lungray.io.base import DecodeOptions, decode_record  # noqa: E402
from lungray.io.decode import decode_bytes  # noqa: E402
from lungray.modeldir import ModelDir, load_model_dir, save_model_dir  # noqa: E402
from lungray.models import build_model, default_config  # noqa: E402
from lungray.preprocess import PreprocessConfig, preprocess  # noqa: E402
from lungray.screen.pipeline import ScreenConfig, run_screen  # noqa: E402


def make_archive(root: Path, count: int, side: int = 512) -> Path:
    import pydicom
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    root.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        base = (np.sin(xx * 6 + index) * np.cos(yy * 4) + 1) / 2 + rng.normal(0, 0.05, (side, side))
        study = root / f"study{index // 4:05d}"
        study.mkdir(exist_ok=True)
        if index % 2:
            Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8)).save(study / f"{index}.png")
            continue
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", generate_uid(), generate_uid()
        ds.Rows = ds.Columns = side
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = (np.clip(base, 0, 1) * 4095).astype(np.uint16).tobytes()
        pydicom.dcmwrite(study / f"{index}.dcm", ds, enforce_file_format=True)
    return root


def make_full_size_archive(root: Path, count: int, side: int = 2048, distinct: int = 2) -> Path:
    """`count` full-size films: `distinct` generated films, each stored in every film_factory storage, in turn.

    Files repeat bytes (generating and encoding a 2048 px film takes about a second), which
    does not matter to a decoder: every file is decoded on its own.
    """
    from film_factory import STORAGES, stored_as, synthetic_film

    storages = list(STORAGES)
    encoded = {}
    for seed in range(min(distinct, count)):
        film = synthetic_film(side, seed=seed)
        for storage in storages:
            encoded[seed, storage] = stored_as(film, storage)
    root.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        storage = storages[index % len(storages)]
        study = root / f"study{index // 4:05d}"
        study.mkdir(exist_ok=True)
        (study / f"{index}{STORAGES[storage]}").write_bytes(encoded[index // len(storages) % distinct, storage])
    return root


class FileDataset(torch.utils.data.Dataset):
    """The baseline's dataset: lungray's decode and preprocessing, per file, at full resolution.

    lungray's rows decode no smaller than twice the model side (lungray.io.codecs): the
    same decode for the 512 px archive, a reduced one for `--full-size` films.
    """

    def __init__(self, paths: list[Path], config: PreprocessConfig) -> None:
        self.paths, self.config = paths, config

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        decoded = decode_bytes(self.paths[index].read_bytes(), self.paths[index].name)
        if not decoded.ok:  # the plain script has no error rows: say which file stopped it
            raise RuntimeError(f"{self.paths[index]}: {decoded.error}")
        return torch.from_numpy(preprocess(decoded.image, self.config))


def load_for_inference(model_dir: Path, fold: bool) -> ModelDir:
    """On the GPU when there is one, as the screening actors score."""
    model = load_model_dir(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    return model.with_folded_batchnorm() if fold else model


def baseline_end_to_end(archive: Path, model_dir: Path, batch_size: int, fold: bool = False, threads: int = 1) -> float:
    """The plain script, timed from loading the model (as lungray's time includes its actor's),
    its model on `threads` torch threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        started = time.perf_counter()
        model = load_for_inference(model_dir, fold)
        paths = sorted(path for path in archive.rglob("*") if path.is_file())
        loader = torch.utils.data.DataLoader(FileDataset(paths, model.preprocess), batch_size=batch_size, num_workers=2)
        scored = sum(len(model.predict_proba(batch.numpy(), batch_size=batch_size)) for batch in loader)
        return scored / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous)


def lungray_end_to_end(archive: Path, model_dir: Path, output: Path, batch_size: int) -> float:
    """Files per second of one `run_screen`, timed without the memory sampler: reading /proc
    for every process of the tree five times a second took about a tenth of the 2-core VM's
    throughput (4,000 files: 170 files/s sampled, 192 not, alternating runs), which the plain
    script is not charged. The screening modules are imported with this script, as the
    plain script's are: importing them took about a second of the first run."""
    started = time.perf_counter()
    summary = run_screen(ScreenConfig(model=str(model_dir), input=str(archive), output=str(output), batch_size=batch_size, throwaway_salt=True))
    seconds = time.perf_counter() - started
    assert summary["by_status"]["ok"] == summary["files_listed"], summary
    return summary["files_listed"] / seconds


def lungray_peak_memory(archive: Path, model_dir: Path, output: Path, batch_size: int) -> float:
    """Peak MB of this process and the local Ray it started over one `run_screen` (not timed)."""
    memory = TreeSampler(os.getpid()).start()
    try:
        lungray_end_to_end(archive, model_dir, output, batch_size)
    finally:
        memory.stop()
    return memory.peak_tree_rss / 2**20


def inference_stage(model_dir: Path, count: int, size: int, batch_size: int) -> dict[str, float]:
    """Bare model vs the screening actor on the same pre-decoded uint8 tensors.

    `ray_actor_images_per_s` counts from the submit (actor start and model load included);
    `ray_actor_steady_images_per_s` from the first scored batch on, which is what an
    archive of millions of files sees once the pool runs.
    """
    import ray

    from lungray.screen.predictor import Predictor

    images = np.random.default_rng(0).integers(0, 256, (count, size, size), dtype=np.uint8)
    model = load_for_inference(model_dir, fold=True)  # as the Predictor scores
    model.predict_proba(images[:batch_size], batch_size=batch_size)  # warm-up

    def bare_rate() -> float:
        started = time.perf_counter()
        model.predict_proba(images, batch_size=batch_size)
        return count / (time.perf_counter() - started)

    bare_before = bare_rate()

    dataset = ray.data.from_numpy(images).rename_columns({"data": "image"})
    # Blocks of one batch each, as the decode tasks deliver them, so results stream back batch by batch.
    dataset = (
        dataset.map_batches(lambda batch: batch.append_column("status", [["ok"] * batch.num_rows]), batch_format="pyarrow")
        .repartition(max(1, count // batch_size))
        .materialize()
    )
    gpus = int(ray.cluster_resources().get("GPU", 0))
    resources = {"num_gpus": 1} if gpus else {"num_cpus": 0.5}
    scored_batches = dataset.map_batches(
        Predictor,
        fn_constructor_kwargs={"model_uri": str(model_dir), "threads": torch.get_num_threads()},
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=batch_size,
        batch_format="pyarrow",
        **resources,
    ).iter_batches(batch_format="pyarrow", batch_size=None)
    started = time.perf_counter()
    first_rows, first_at, scored = 0, 0.0, 0
    for batch in scored_batches:
        if not scored:
            first_rows, first_at = batch.num_rows, time.perf_counter()
        scored += batch.num_rows
    ended = time.perf_counter()
    total_rate = scored / (ended - started)
    steady_rate = (scored - first_rows) / (ended - first_at)
    bare_after = bare_rate()
    bare = (bare_before + bare_after) / 2
    return {
        "images": count,
        "bare_images_per_s": round(bare, 1),
        "bare_before_after_images_per_s": [round(bare_before, 1), round(bare_after, 1)],
        "ray_actor_images_per_s": round(total_rate, 1),
        "ratio": round(total_rate / bare, 3),
        "ray_actor_steady_images_per_s": round(steady_rate, 1),
        "steady_ratio": round(steady_rate / bare, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--stage-images", type=int, default=None, help="pre-decoded images for the stage test (default: max(2048, files))")
    parser.add_argument("--full-size", action="store_true", help="2048 px 12-bit films in every storage instead of 512 px DICOM/PNG")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from lungray.raysession import init_ray

    init_ray(progress_bars=False)
    default_threads = torch.get_num_threads()  # what a plain script gets; lungray's CPU actor runs two (plan_actors)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        config = default_config("cnn")
        model_dir = save_model_dir(
            root / "model", build_model(config).state_dict(),
            {
                "architecture": config.to_dict(), "preprocess": PreprocessConfig(size=args.size).to_dict(), "threshold": 0.5,
                "decode": decode_record(DecodeOptions()),  # today's decoder: screen refuses a model without a record
            },
        )
        archive = make_full_size_archive if args.full_size else make_archive
        small = archive(root / "small", args.files)
        large = archive(root / "large", args.files * args.scale)
        baseline_before = baseline_end_to_end(small, model_dir, args.batch_size)
        baseline_folded = baseline_end_to_end(small, model_dir, args.batch_size, fold=True)
        baseline_default_threads = baseline_end_to_end(small, model_dir, args.batch_size, threads=default_threads)
        # The first run in a fresh Ray also starts Ray Data's own actors and the decode workers'
        # imports; the second is what a job on a running cluster sees.
        first_rate = lungray_end_to_end(small, model_dir, root / "out-first", args.batch_size)
        lungray_rate = lungray_end_to_end(small, model_dir, root / "out-second", args.batch_size)
        baseline_after = baseline_end_to_end(small, model_dir, args.batch_size)
        baseline = (baseline_before + baseline_after) / 2
        small_peak = lungray_peak_memory(small, model_dir, root / "out-small", args.batch_size)
        large_peak = lungray_peak_memory(large, model_dir, root / "out-large", args.batch_size)
        stage = inference_stage(model_dir, args.stage_images or max(2048, args.files), args.size, args.batch_size)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    print(
        json.dumps(
            {
                "device": device,
                "files": args.files,
                "image_side": 2048 if args.full_size else 512,
                "model_input": args.size,
                "end_to_end": {
                    "baseline_dataloader_images_per_s": round(baseline, 1),
                    "baseline_dataloader_before_after_images_per_s": [round(baseline_before, 1), round(baseline_after, 1)],
                    "baseline_dataloader_folded_images_per_s": round(baseline_folded, 1),
                    "baseline_dataloader_default_threads": default_threads,
                    "baseline_dataloader_default_threads_images_per_s": round(baseline_default_threads, 1),
                    "lungray_screen_first_run_images_per_s": round(first_rate, 1),
                    "lungray_screen_images_per_s": round(lungray_rate, 1),
                    "ratio_first_run": round(first_rate / baseline, 3),
                    "ratio": round(lungray_rate / baseline, 3),
                    "ratio_to_folded": round(lungray_rate / baseline_folded, 3),
                    "ratio_to_default_threads": round(lungray_rate / baseline_default_threads, 3),
                },
                "inference_stage": stage,
                "peak_memory_mb": {str(args.files): round(small_peak), str(args.files * args.scale): round(large_peak)},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
