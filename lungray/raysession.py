"""Connecting to Ray the same way from the CLI, `ray job submit`, and tests.

Under `ray job submit` (or with RAY_ADDRESS set) the job joins that cluster, with whatever
authentication its operators chose; on a laptop it starts a local Ray sized for the
machine, with Ray's token authentication as Ray sets it (lungray never touches
RAY_AUTH_MODE). Small machines get a modest object store so that a 2-core, few-GB box is
not swamped, and progress bars follow the terminal.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import socket
import tempfile
from pathlib import Path

import ray
import yaml

log = logging.getLogger(__name__)

RAY_DATA_LOGGING_CONFIG = "RAY_DATA_LOGGING_CONFIG"  # read by every process when it imports Ray Data
PROGRESS_BARS_LOGGER = "ray.data._internal.progress"
AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def init_ray(num_cpus: int | None = None, progress_bars: bool | None = None) -> None:
    """Join RAY_ADDRESS if set, else start a local Ray; a no-op when Ray is already up."""
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        else:
            total_cpus = num_cpus or os.cpu_count() or 1
            start_local_ray(total_cpus, min(2_000_000_000, max(300_000_000, 150_000_000 * total_cpus)))
        log.info("ray resources: %s", ray.cluster_resources())
    from ray.data import DataContext

    if progress_bars is not None:
        DataContext.get_current().enable_progress_bars = progress_bars


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dashboard_installed() -> bool:
    """Whether Ray's dashboard can start: `ray[default]` is installed, not a minimal Ray."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401 - the import Ray itself checks with
    except ImportError:
        return False
    return True


def start_local_ray(num_cpus: int, object_store_memory: int, log_to_driver: bool = True) -> None:
    """A local Ray whose own processes find its state API, even beside other Ray instances.

    The dashboard stays on: Ray Train's placement-group cleaner (which frees the CPUs of
    trials Tune stops) looks the cluster up through the state API. Without an address it
    guesses from the newest Ray session on the machine, which is another instance's when
    several run (a test suite beside a training job); RAY_API_SERVER_ADDRESS, inherited by
    the processes Ray starts, points them at this one. It is removed from the driver again
    afterwards, since Ray would let it override an explicit address in a later `ray` command.
    A minimal Ray install (a GPU box's wheel kit, say) runs without the dashboard, with a warning.
    Ray's token authentication stays as Ray sets it (on, unless RAY_AUTH_MODE says otherwise):
    the instance's ports listen on every interface, and without it anyone who reaches them
    could run code in it and read its environment, the site's patient salt included.
    """
    if not dashboard_installed():
        log.warning("ray[default] is not installed: Ray runs without its dashboard (`ray job submit` and Tune need it)")
        ray.init(num_cpus=num_cpus, object_store_memory=object_store_memory, include_dashboard=False, log_to_driver=log_to_driver)
        return
    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    try:
        ray.init(
            num_cpus=num_cpus,
            object_store_memory=object_store_memory,
            include_dashboard=True,
            dashboard_port=port,
            log_to_driver=log_to_driver,
        )
    finally:
        del os.environ["RAY_API_SERVER_ADDRESS"]


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1.0))


def quiet_ray(verbose: bool) -> None:
    """Without --verbose, a long job prints its own progress lines, not Ray's INFO lines
    (dozens per dataset: execution plans, operator stats, commits; Ray Train's worker group
    and checkpoint reports). Called before Ray starts, so that the processes of a local Ray
    inherit the Ray Data console level too (`RAY_DATA_LOGGING_CONFIG`)."""
    if verbose:
        return
    config = quiet_ray_data_logging_config()
    if config is not None:
        os.environ.setdefault(RAY_DATA_LOGGING_CONFIG, str(config))
    from ray.data import DataContext

    context = DataContext.get_current()
    context.print_on_execution_start = False
    context.enable_progress_bars = False
    # "ray" itself is set back to INFO by ray.init (its "Started a local Ray instance" line stays).
    for name in ("ray", "ray.data", "ray.data._internal.datasource.delta_datasink", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray's notice that token authentication is on, printed by every local Ray: it stays on.
    logging.getLogger(AUTH_NOTICE_LOGGER).setLevel(logging.ERROR)
    logging.getLogger(PROGRESS_BARS_LOGGER).setLevel(logging.ERROR)


def quiet_ray_data_logging_config() -> Path | None:
    """A Ray Data logging config file: Ray's default, its console at WARNING (its log files
    keep every level) and without the notice that progress bars are off, which lungray chose.

    None where this Ray has no default config to start from (its layout is internal).
    """
    try:
        from ray.data._internal.logging import DEFAULT_CONFIG

        config = copy.deepcopy(DEFAULT_CONFIG)
        config["handlers"]["console"]["level"] = "WARNING"
        config["loggers"][PROGRESS_BARS_LOGGER] = {"level": "ERROR"}
    except (ImportError, KeyError, TypeError):
        return None
    text = yaml.safe_dump(config, sort_keys=True)
    target = Path(tempfile.gettempdir()) / f"lungray-ray-data-logging-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
    if not target.exists():  # one file per content, written whole: workers may read it at any time
        temporary = target.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(text)
        temporary.replace(target)
    return target
