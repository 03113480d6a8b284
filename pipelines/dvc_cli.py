"""DVC as a subprocess: the stage graph, streamed stage runs, and what their output means.

Nothing here knows about Prefect: the flows (pipelines/flows.py) pass a `log` callback. Every command is
an argument list (never a shell string) run with this interpreter's `bin/` first on PATH, so that
dvc.yaml's `python -m stages.<name>` runs in the same virtual environment as the flow.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from far.errors import FAILED, INVALID_INPUT, FarError, InvalidInputError

LogFn = Callable[[str, str], None]  # (stream "stdout" | "stderr", line)

# DVC's own messages (dvc/stage/run.py, dvc/stage/cache.py, dvc/repo/reproduce.py), matched literally.
_RAN = re.compile(r"^Running stage '([^']+)'")
_SKIPPED = re.compile(r"^Stage '([^']+)' (?:didn't change, skipping|is cached - skipping run)")
_EXITED = re.compile(r"failed to run: .*, exited with (-?\d+)\s*$")
_DVC_REPRO_ERROR = re.compile(r"^ERROR: failed to reproduce '[^']+': ")
# DVC-level failures (the stage never started) that another attempt can fix; every other one (a missing
# dependency, an unknown stage, a broken dvc.yaml) fails the same way again.
_TRANSIENT_DVC = ("Unable to acquire lock", "timed out", "Timeout", "Connection", "Temporary failure",
                  "Too many open files", "No space left")


class StageFailed(FarError):
    """A DVC stage failed; the message names the stage and its cause (the stage's last error line)."""

    def __init__(self, stage: str, cause: str, exit_code: int | None, retryable: bool) -> None:
        why = "transient, may be retried" if retryable else "retrying cannot help"
        code = f"exit code {exit_code}" if exit_code is not None else "DVC error"
        super().__init__(f"stage '{stage}' failed ({code}; {why}): {cause}")
        self.stage, self.cause, self.stage_exit_code, self.retryable = stage, cause, exit_code, retryable
        self.exit_code = FAILED if retryable else INVALID_INPUT  # of `python -m pipelines.flows`

    def __reduce__(self):  # noqa: ANN204 - keep the fields when Prefect pickles the exception
        return (type(self), (self.stage, self.cause, self.stage_exit_code, self.retryable))


class DvcError(FarError):
    """A DVC bookkeeping command (dag, queue, exp show, push) failed."""


@dataclass
class Completed:
    """A finished command: its exit code and the tail of each stream (progress bars collapsed)."""

    returncode: int
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)


def dvc(*args: str) -> list[str]:
    """`dvc <args>` as an argument list, run by this interpreter (the venv's DVC)."""
    return [sys.executable, "-m", "dvc", *args]


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment with the interpreter's bin/ first on PATH (dvc.yaml's `python`)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.update(extra)
    return env


def threads_per_job(jobs: int) -> dict[str, str]:
    """OMP_NUM_THREADS for `jobs` experiments at once: each gets its share of the cores (unless the user set it).

    Several torch processes that each spin up one thread per core are many times slower than the same
    processes sharing the cores out (measured ~10x on 2 cores).
    """
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, jobs)))}


def _clean(raw: str) -> str:
    # A progress bar rewrites its line with \r: keep what the terminal would show last.
    parts = [p for p in raw.rstrip("\n").split("\r") if p.strip()]
    return parts[-1].rstrip() if parts else ""


def stream(cmd: list[str], cwd: Path, log: LogFn, keep: int = 400) -> Completed:
    """Run `cmd`, calling `log(stream, line)` for each output line as it arrives (in this thread)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1)
    lines: queue.Queue[tuple[str, str | None]] = queue.Queue()

    def pump(name: str, pipe) -> None:  # noqa: ANN001 - a text pipe
        for raw in pipe:
            lines.put((name, raw))
        lines.put((name, None))

    readers = [threading.Thread(target=pump, args=(n, p), daemon=True)
               for n, p in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for t in readers:
        t.start()
    tails: dict[str, deque[str]] = {"stdout": deque(maxlen=keep), "stderr": deque(maxlen=keep)}
    open_streams = 2
    while open_streams:
        name, raw = lines.get()
        if raw is None:
            open_streams -= 1
            continue
        if line := _clean(raw):
            tails[name].append(line)
            log(name, line)
    returncode = proc.wait()
    return Completed(returncode, list(tails["stdout"]), list(tails["stderr"]))


def run_quiet(args: Iterable[str], cwd: Path, what: str, **env: str) -> str:
    """Run a DVC command for its output; a failure raises DvcError naming `what` and DVC's message."""
    proc = subprocess.run(dvc(*args), cwd=cwd, env=subprocess_env(**env), capture_output=True, text=True)
    if proc.returncode != 0:
        message = _last_error(proc.stderr.splitlines() or proc.stdout.splitlines())
        raise DvcError(f"{what} failed in {cwd}: {message}")
    return proc.stdout


def run_detaching(args: Iterable[str], cwd: Path, what: str, **env: str) -> None:
    """Run a DVC command that leaves daemons behind (`dvc queue start`); a failure raises DvcError.

    Its output goes to a file, not a pipe: the daemon DVC forks keeps the command's stdout and stderr open
    until its workers exit, so reading a pipe to its end waited here for the whole queue (seen: the ablation
    flow stopped polling the queue as soon as it started the workers)."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.run(dvc(*args), cwd=cwd, env=subprocess_env(**env), stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, text=True)
        if proc.returncode != 0:
            out.seek(0)
            raise DvcError(f"{what} failed in {cwd}: {_last_error(out.read().splitlines())}")


def _last_error(lines: list[str]) -> str:
    cleaned = [_clean(line) for line in lines if _clean(line)]
    errors = [line for line in cleaned if line.startswith("ERROR")]
    return (errors or cleaned or ["(no output)"])[-1]


def stage_events(lines: Iterable[str]) -> dict[str, str]:
    """{stage: "ran" | "skipped"} from `dvc repro` / `dvc exp run` output (skipped = up to date or cached)."""
    events: dict[str, str] = {}
    for line in lines:
        if m := _RAN.match(line):
            events[m.group(1)] = "ran"
        elif m := _SKIPPED.match(line):
            events[m.group(1)] = "skipped"
    return events


def classify_failure(stage: str, done: Completed) -> StageFailed:
    """Why `dvc repro --single-item <stage>` failed, and whether another attempt could succeed.

    The stage's own exit code (DVC reports "exited with N") decides: far.errors.INVALID_INPUT (2) means bad
    params or inputs, never retried; any other code (a crash, an OOM kill) may be transient. When DVC
    failed before running the command (a missing dependency, an unknown stage), only lock and I/O
    contention are worth retrying. The cause is the stage's last error line, not DVC's summary.
    """
    exit_code = None
    for line in reversed(done.stderr):
        if m := _EXITED.search(line):
            exit_code = int(m.group(1))
            break
    own = [line for line in done.stderr if not _DVC_REPRO_ERROR.match(line) and "%|" not in line]
    if exit_code is not None:
        cause = own[-1] if own else _last_error(done.stderr)
        return StageFailed(stage, cause, exit_code, retryable=exit_code != INVALID_INPUT)
    cause = _last_error(done.stderr or done.stdout)
    cause = _DVC_REPRO_ERROR.sub("", cause)
    transient = any(marker.lower() in cause.lower() for marker in _TRANSIENT_DVC)
    return StageFailed(stage, cause, None, retryable=transient)


# ------------------------------------------------------------------------------------------ the graph
def _parse_dot(text: str) -> tuple[list[str], list[tuple[str, str]]]:
    nodes: list[str] = []
    edges: list[tuple[str, str]] = []
    for line in text.splitlines():
        names = re.findall(r'"((?:[^"\\]|\\.)*)"', line)
        if "->" in line and len(names) == 2:
            edges.append((names[0], names[1]))
        elif len(names) == 1 and names[0] not in nodes:
            nodes.append(names[0])
    for a, b in edges:
        for n in (a, b):
            if n not in nodes:
                nodes.append(n)
    return nodes, edges


@dataclass
class StageGraph:
    """The DVC pipeline: stages in a run order, and each stage's direct upstream stages."""

    order: list[str]
    upstream: dict[str, set[str]]

    def ancestors(self, stage: str) -> set[str]:
        seen: set[str] = set()
        todo = [stage]
        while todo:
            for up in self.upstream[todo.pop()]:
                if up not in seen:
                    seen.add(up)
                    todo.append(up)
        return seen

    def downstream(self, stages: Iterable[str]) -> set[str]:
        """`stages` and every stage that depends on one of them, directly or not."""
        out = set(stages)
        for stage in self.order:  # graph order: a stage's upstream stages come first
            if self.upstream[stage] & out:
                out.add(stage)
        return out

    def select(self, targets: Iterable[str] | None) -> list[str]:
        """The stages needed for `targets` (the targets and their ancestors), in run order; all if None."""
        if targets is None:
            return list(self.order)
        wanted: set[str] = set()
        for t in targets:
            if t not in self.upstream:
                raise InvalidInputError(f"no stage named {t!r} in dvc.yaml; stages: {', '.join(self.order)}")
            wanted |= {t} | self.ancestors(t)
        return [s for s in self.order if s in wanted]


def stage_graph(root: Path) -> StageGraph:
    """Read the graph with `dvc dag --dot`; ties are broken by the order of dvc.yaml (its table of contents)."""
    nodes, edges = _parse_dot(run_quiet(["dag", "--dot"], root, "`dvc dag`"))
    declared = list((yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {}))
    rank = {name: i for i, name in enumerate(declared)}
    upstream: dict[str, set[str]] = {n: set() for n in nodes}
    for a, b in edges:  # `dvc dag` draws upstream -> downstream
        upstream[b].add(a)
    order: list[str] = []
    pending = dict(upstream)
    while pending:
        ready = sorted((n for n, ups in pending.items() if ups <= set(order)),
                       key=lambda n: (rank.get(n, len(rank)), n))
        if not ready:
            raise DvcError(f"cycle in the stage graph of {root / 'dvc.yaml'}: {sorted(pending)}")
        order.append(ready[0])
        del pending[ready[0]]
    return StageGraph(order, upstream)


def stage_params(root: Path) -> dict[str, list[str]]:
    """{stage: params.yaml keys it reads} from dvc.yaml (`params:` entries of the default params file)."""
    stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {})
    keys: dict[str, list[str]] = {}
    for name, spec in stages.items():
        keys[name] = []
        for entry in spec.get("params", []) or []:
            if isinstance(entry, str):
                keys[name].append(entry)
            elif isinstance(entry, dict):
                keys[name] += [k for f, ks in entry.items() if f == "params.yaml" for k in (ks or [])]
    return keys
