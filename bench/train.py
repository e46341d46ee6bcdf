"""Training throughput per worker and peak memory for both models; prints JSON.

    python bench/train.py [--size 224] [--batch-size 32] [--steps 12] [--threads 1 2]

For each model and thread count, in a fresh subprocess (so peak RSS is the model's own):
- `lungray`: the real `train_one_epoch` (uint8 -> float, augmentation on the worker,
  weighted cross-entropy, Adam, channels_last) over in-memory batches;
- `baseline`: a bare forward/backward/step on float tensors in the default memory format.
On a GPU (when one is present) both run there with bf16 autocast and channels_last.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(arch: str, threads: int, size: int, batch_size: int, steps: int) -> dict:
    import time

    import torch

    from lungray.models import build_model, count_parameters, default_config
    from lungray.train.augment import AugmentConfig
    from lungray.train.loop import train_one_epoch

    torch.set_num_threads(threads)
    use_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if use_gpu else "cpu")
    generator = torch.Generator(device=device).manual_seed(0)
    stored = torch.randint(0, 256, (batch_size, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).to(device)
    labels = torch.randint(0, 2, (batch_size,), generator=torch.Generator().manual_seed(1)).to(device)
    batches = [{"image": stored, "label": labels}] * steps

    model = build_model(default_config(arch)).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    weights = torch.ones(2, device=device)
    train_one_epoch(model, batches[:2], optimizer, weights, AugmentConfig(), generator, use_gpu)  # warm-up
    shard = train_one_epoch(model, batches, optimizer, weights, AugmentConfig(), generator, use_gpu)
    if use_gpu:
        torch.cuda.synchronize()
    lungray_rate = shard.images / shard.seconds

    bare = build_model(default_config(arch)).to(device)
    bare_optimizer = torch.optim.Adam(bare.parameters(), lr=1e-3)
    floats = stored.float().unsqueeze(1) / 255.0

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_gpu):
            loss = torch.nn.functional.cross_entropy(bare(floats).float(), labels)
        bare_optimizer.zero_grad()
        loss.backward()
        bare_optimizer.step()

    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if use_gpu:
        torch.cuda.synchronize()
    baseline_rate = steps * batch_size / (time.perf_counter() - started)
    return {
        "model": arch,
        "threads": threads,
        "device": torch.cuda.get_device_name() if use_gpu else "cpu",
        "parameters": count_parameters(model),
        "lungray_images_per_s": round(lungray_rate, 1),
        "baseline_images_per_s": round(baseline_rate, 1),
        "ratio": round(lungray_rate / baseline_rate, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20) if use_gpu else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--one", nargs=2, metavar=("ARCH", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.size, args.batch_size, args.steps)))
        return
    results = []
    for arch in ("cnn", "cnn_lstm"):
        for threads in args.threads:
            command = [sys.executable, __file__, "--one", arch, str(threads), "--size", str(args.size), "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
            output = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            results.append(json.loads(output.stdout.strip().splitlines()[-1]))
    print(json.dumps({"size": args.size, "batch_size": args.batch_size, "cpu_count": os.cpu_count(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
