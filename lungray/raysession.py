"""Connecting to Ray the same way from the CLI, `ray job submit`, and tests.

Under `ray job submit` (or with RAY_ADDRESS set) the job joins that cluster; on a laptop
it starts a local Ray sized for the machine. Small machines get a modest object store so
that a 2-core, few-GB box is not swamped, and progress bars follow the terminal.
"""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None, progress_bars: bool | None = None) -> None:
    """Join RAY_ADDRESS if set, else start a local Ray; a no-op when Ray is already up."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        else:
            total_cpus = num_cpus or os.cpu_count() or 1
            ray.init(
                num_cpus=total_cpus,
                object_store_memory=min(2_000_000_000, max(300_000_000, 150_000_000 * total_cpus)),
                # The dashboard stays on: Tune leaked resources without it (notes on Ray 2.60).
                log_to_driver=True,
            )
        log.info("ray resources: %s", ray.cluster_resources())
    from ray.data import DataContext

    if progress_bars is not None:
        DataContext.get_current().enable_progress_bars = progress_bars


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1.0))
