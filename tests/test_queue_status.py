"""pipelines/flows.py's reading of `dvc queue status`, and when the ablation flow restarts a queue's workers."""

from __future__ import annotations

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
