"""Starting a local Ray: with the dashboard where ray[default] is installed, without it on a minimal Ray."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

from lungray.raysession import dashboard_installed


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
