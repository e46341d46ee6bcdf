"""The GPU paths, on a CUDA machine only (skipped elsewhere, saying so): DDP training over
NCCL, screening on GPU actors, folded scoring on the GPU. `bench/device.sh` runs them on a
lent GPU machine; CI has none."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from model_factory import untrained_model_dir
from test_screen import junk_archive, listed
from test_train import read_split, tiny_config, write_ingested

from lungray.io.decode import DecodeOptions
from lungray.io.rows import process_file
from lungray.modeldir import load_model_dir, read_meta
from lungray.raysession import start_local_ray
from lungray.screen.pipeline import ScreenConfig, plan_actors, run_screen
from lungray.train.trainer import run_training
from lungray.screen.tables import read_table

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/device.sh runs these on a lent one)"),
]


@pytest.fixture(scope="module")
def gpu_ray() -> Iterator[None]:
    """The suite's Ray if one is up (it sees the GPUs too), else one sized for this machine."""
    import ray

    started = not ray.is_initialized()
    if started:
        start_local_ray(num_cpus=min(8, os.cpu_count() or 1), object_store_memory=2_000_000_000, log_to_driver=False)
    assert ray.cluster_resources().get("GPU", 0) >= 1, "CUDA sees a GPU but Ray does not"
    yield
    if started:
        ray.shutdown()


def test_every_gpu_trains_over_nccl(gpu_ray: None, tmp_path: Path) -> None:
    workers = torch.cuda.device_count()
    data = write_ingested(tmp_path / "data")
    output = run_training(tiny_config(data, tmp_path / "model", workers=workers, use_gpu=True, cpus_per_worker=1.0))

    meta = read_meta(Path(output))
    assert meta["hardware"] == {"workers": workers, "device": torch.cuda.get_device_name(), "threads_per_worker": 1, "backend": "nccl"}
    assert [record["epoch"] for record in meta["history"]] == [0, 1]
    images, _ = read_split(data, "val")
    on_gpu = load_model_dir(output, device="cuda").predict_proba(images)
    on_cpu = load_model_dir(output).predict_proba(images)
    np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-4)


def test_screen_scores_on_gpu_actors_as_the_cpu_would(gpu_ray: None, tmp_path: Path) -> None:
    import ray

    model_dir = untrained_model_dir(tmp_path / "model")
    archive = junk_archive(tmp_path / "archive")
    config = ScreenConfig(model=str(model_dir), input=str(archive), output=str(tmp_path / "out"))
    assert plan_actors(config, ray.cluster_resources()).resources == {"num_gpus": 1}

    summary = run_screen(config)

    images = read_table(str(tmp_path / "out"), "images").to_pylist()
    assert sorted(row["path"] for row in images) == listed(archive)
    assert summary["by_status"] == {"ok": 14, "error": 7}
    model = load_model_dir(model_dir)  # on the CPU, as trained (not folded)
    for row in images:
        if row["status"] != "ok":
            continue
        _, stored = process_file(row["path"], row["path"], Path(row["path"]).stat().st_size, model.preprocess, DecodeOptions(), 1 << 30, scope=None, salt=None)
        assert row["prob"] == pytest.approx(model.predict_proba(stored[None])[0], abs=1e-4), row["path"]


def test_folded_model_scores_alike_on_the_gpu(tmp_path: Path) -> None:
    model = load_model_dir(untrained_model_dir(tmp_path / "model", size=224), device="cuda")
    images = np.random.default_rng(0).integers(0, 256, (64, 224, 224), dtype=np.uint8)
    np.testing.assert_allclose(model.with_folded_batchnorm().predict_proba(images), model.predict_proba(images), atol=1e-4)
