"""Starting a local Ray: with the dashboard where ray[default] is installed, without it on a minimal Ray."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

from lungray.raysession import RAY_DATA_LOGGING_CONFIG, dashboard_installed, quiet_ray_data_logging_config


def test_the_dashboard_is_found_with_ray_default() -> None:
    assert dashboard_installed()  # pyproject asks for ray[default]


def test_a_minimal_ray_starts_without_the_dashboard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray.dashboard.optional_deps", None)  # import now fails, as on a minimal Ray
    assert not dashboard_installed()


@pytest.mark.timeout(120)
def test_a_local_ray_starts_on_a_minimal_install() -> None:
    """In a process of its own, beside the suite's Ray."""
    code = (
        "import sys, ray\n"
        "sys.modules['ray.dashboard.optional_deps'] = None\n"
        "from lungray.raysession import start_local_ray\n"
        "start_local_ray(num_cpus=1, object_store_memory=100_000_000)\n"
        "assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42\n"
        "print('dashboard url:', repr(ray.get_runtime_context().worker.node.address_info.get('webui_url')))\n"
        "ray.shutdown()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ray[default] is not installed" in done.stderr
    assert "dashboard url: ''" in done.stdout


@pytest.mark.timeout(120)
def test_the_quiet_ray_data_config_keeps_warnings_on_the_console_and_every_level_in_the_log_file() -> None:
    """Loaded by Ray Data itself, as every process of a local Ray does when it imports it."""
    code = (
        "import logging\n"
        "import ray.data\n"
        "logging.getLogger('ray.data.some_stage').info('an info line')\n"
        "logging.getLogger('ray.data.some_stage').warning('a warning line')\n"
        "logging.getLogger('ray.data._internal.progress').warning('Progress bars disabled.')\n"
        "logger = logging.getLogger('ray.data')\n"
        "print('levels:', logging.getLevelName(logger.level), sorted((type(h).__name__, logging.getLevelName(h.level)) for h in logger.handlers))\n"
    )
    env = {**os.environ, RAY_DATA_LOGGING_CONFIG: str(quiet_ray_data_logging_config())}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr[-2000:]
    console = done.stdout + done.stderr
    assert "a warning line" in console
    assert "an info line" not in console and "Progress bars disabled" not in console
    # Ray's own handlers: the console at WARNING, the session's log file taking every level the logger passes.
    assert "levels: DEBUG [('PlainRayHandler', 'WARNING'), ('SessionFileHandler', 'NOTSET')]" in console
