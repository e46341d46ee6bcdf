"""The command line's exit codes: 2 with one line for a bad argument or input, 1 with the
traceback for a run that failed (docs/operators.md, "Exit codes")."""

from __future__ import annotations

import argparse

import pyarrow as pa
import pytest
import ray

from lungray import cli


def run_failing_with(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> int:
    """`lungray evaluate` whose work raises `error`."""

    def failing(args: argparse.Namespace) -> int:
        raise error

    monkeypatch.setattr(cli, "cmd_evaluate", failing)
    return cli.main(["evaluate", "MODEL", "DATA"])


def test_a_bad_argument_is_exit_2_with_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_failing_with(monkeypatch, FileNotFoundError("DATA is not a finished lungray ingest")) == 2
    assert capsys.readouterr().err == "lungray evaluate: error: DATA is not a finished lungray ingest\n"


def test_a_failure_inside_the_run_is_not_taken_for_a_bad_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ray task's error takes its cause's class: a ValueError raised in a worker was exit 2,
    "bad arguments", without the traceback that says where the run failed. Arrow's errors in
    the driver stay exit 2: they come from checking the arguments (a malformed URI)."""
    task_error = ray.exceptions.RayTaskError("decode", "Traceback ...", ValueError("bad block")).as_instanceof_cause()
    assert isinstance(task_error, ValueError)
    with pytest.raises(type(task_error)):
        run_failing_with(monkeypatch, task_error)
    assert run_failing_with(monkeypatch, pa.ArrowInvalid("Path cannot start with a separator")) == 2
