"""pipelines/flows.py's reading of `dvc queue status`, and when the ablation flow restarts a queue's workers."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from pipelines import dvc_cli
from pipelines.flows import parse_queue_status, stalled

# The shape of `dvc queue status` (DVC 3) after both workers exited with experiments still queued, as seen here.
STATUS = """Task     Name              Created       Status
9f3e2a1  baseline-s3       06:37 AM      Success
ffa56f3  baseline-s5       06:37 AM      Queued
598a9dd  +fusion-s3        06:37 AM      Queued

Worker status: 0 active, 0 idle
"""


def test_rows_and_the_worker_count_are_read():
    rows, workers = parse_queue_status(STATUS)
    assert rows == {"9f3e2a1": ("baseline-s3", "Success"), "ffa56f3": ("baseline-s5", "Queued"),
                    "598a9dd": ("+fusion-s3", "Queued")}
    assert workers == 0
    assert parse_queue_status(STATUS.replace("0 active, 0 idle", "1 active, 1 idle"))[1] == 2
    assert parse_queue_status(STATUS.replace("Worker status: 0 active, 0 idle", ""))[1] is None


def test_a_queue_is_stalled_only_with_work_waiting_and_no_worker():
    waiting = {"a": "Success", "b": "Queued"}
    assert stalled(waiting, 0)
    assert not stalled(waiting, 1)  # a worker between two tasks
    assert not stalled({"a": "Running", "b": "Queued"}, 0)  # DVC may not list a busy worker (treeverse/dvc#10427)
    assert not stalled({"a": "Success", "b": "Failed"}, 0)  # finished
    assert not stalled(waiting, None)  # no worker line: nothing to go on


# `dvc queue start` forks a daemon that keeps its stdout and stderr until the workers exit. A stand-in with that
# one property (a child that outlives its parent and holds the parent's output): DVC's daemon needs a queue.
DAEMONIZING = """
import subprocess, sys, pathlib
child = subprocess.Popen([sys.executable, "-c", "import time; print('worker', flush=True); time.sleep(120)"])
pathlib.Path(sys.argv[1]).write_text(str(child.pid))
print("started", flush=True)
"""


def test_starting_workers_returns_while_the_daemon_lives(tmp_path, monkeypatch):
    script, pid_file = tmp_path / "start.py", tmp_path / "daemon.pid"
    script.write_text(DAEMONIZING)
    monkeypatch.setattr(dvc_cli, "dvc", lambda *args: [sys.executable, str(script), str(pid_file)])
    dvc_cli.run_detaching(["queue", "start"], tmp_path, "`dvc queue start`")
    daemon = int(pid_file.read_text())
    try:
        os.kill(daemon, 0)  # still running: run_detaching did not wait for the daemon's end of the output
    finally:
        os.kill(daemon, signal.SIGKILL)


def test_a_failed_start_names_the_command_and_dvcs_error(tmp_path, monkeypatch):
    failing = [sys.executable, "-c", "import sys; print('ERROR: no git commit'); sys.exit(1)"]
    monkeypatch.setattr(dvc_cli, "dvc", lambda *args: failing)
    with pytest.raises(dvc_cli.DvcError, match="`dvc queue start` failed .*ERROR: no git commit"):
        dvc_cli.run_detaching(["queue", "start"], tmp_path, "`dvc queue start`")
