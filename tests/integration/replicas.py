"""Find a Serve replica's process under the test's `serve run` (Ray titles its workers
`ray::ServeReplica:<app>:<deployment>[.<method>]`)."""

from __future__ import annotations

import time

import psutil


def replica_pids(root_pid: int, deployment: str, app: str = "artserve") -> list[int]:
    title = f"ServeReplica:{app}:{deployment}"
    pids = []
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            words = " ".join(proc.cmdline()).split()
        except psutil.Error:
            continue
        if words and (words[0].endswith(title) or words[0].split(".handle", 1)[0].endswith(title)):
            pids.append(proc.pid)
    return pids


def wait_for_new_pid(root_pid: int, deployment: str, old: set[int], timeout_s: float = 90) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        new = set(replica_pids(root_pid, deployment)) - old
        if new:
            return new.pop()
        time.sleep(0.5)
    raise AssertionError(f"no new {deployment} replica within {timeout_s}s")
