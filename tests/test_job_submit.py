"""`ray job submit` end to end: a local head with the dashboard, the screening job, its outputs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, SAMPLES, free_port
from model_factory import untrained_model_dir
from lungray.screen.tables import read_table

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def ray_cli() -> str:
    executable = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if executable is None:
        pytest.skip("the ray CLI is not installed")
    return executable


def test_screen_job_submitted_to_a_local_head(tmp_path: Path) -> None:
    ray = ray_cli()
    port, dashboard_port = free_port(), free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="lr-", dir="/tmp"))  # Ray's socket paths must stay under 108 bytes
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    # The job's `python` is the one this suite runs in, as with an activated virtualenv.
    env.update(RAY_AUTH_MODE="disabled", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    start = subprocess.run(
        [
            ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
            "--include-dashboard", "true", "--num-cpus", "2", "--disable-usage-stats",
            # Another Ray on the machine (the suite's own) holds the default agent ports.
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
            "--temp-dir", str(temp_dir),
        ],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        model = untrained_model_dir(tmp_path / "model", threshold=0.5)
        archive = tmp_path / "archive"
        shutil.copytree(SAMPLES / "kermany-mini" / "NORMAL", archive / "normal")
        (archive / "junk.txt").write_text("not an image\n")
        output = tmp_path / "screen"
        command = [
            ray, "job", "submit", "--address", f"http://127.0.0.1:{dashboard_port}", "--working-dir", str(REPO),
            "--", "python", "jobs/screen.py", "--model", str(model), "--input", str(archive), "--output", str(output),
            "--date", "2026-11-27", "--incremental",
        ]
        for _ in range(20):  # the job agent comes up a few seconds after `ray start` returns
            submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in submit.stderr:
                break
            time.sleep(2)
        log = submit.stdout + submit.stderr
        assert submit.returncode == 0, log[-4000:]
        assert "succeeded" in log.lower()  # ray prints "Job 'raysubmit_...' succeeded"
        images = read_table(str(output), "images")
        assert images.num_rows == 62 and images.to_pandas()["status"].value_counts().to_dict() == {"ok": 61, "error": 1}
        assert read_table(str(output), "studies").num_rows == 2
        assert len(list((output / "runs").glob("*.json"))) == 1
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_cluster(temp_dir: Path) -> None:
    """Stop this head only (`ray stop` would stop every Ray on the machine, the suite's own too)."""
    marker = str(temp_dir).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue
