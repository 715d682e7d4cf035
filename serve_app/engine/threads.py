"""Torch work off the step loop runs on a thread that ends with it.

Torch's CPU kernels run on OpenMP, and OpenMP (libgomp) keeps a pool of worker threads for
every thread that has used it, for as long as that thread lives. Once those pools hold more
threads than the machine has cores, libgomp stops spinning between parallel regions, and
every kernel pays to wake its workers. Measured on the 2-core development VM (tiny-flux,
256², one image, benchmarks/torch_threads.py): 7.8 ms a step when the stepping thread is the only
live one that has run torch, 13.9 ms with a second one alive, as when the replica's own thread
built the pipeline. So the step
loop's thread is the replica's one long-lived torch thread, and the torch work that must run
before it starts (building the pipeline) or beside it (loading a LoRA adapter) runs here, on a
thread of its own that ends, pool and all, when the work does.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def _start(fn: Callable[..., T], args: tuple, settle: Callable[[bool, Any], None], name: str) -> threading.Thread:
    def target() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the caller, who re-raises it
            settle(False, exc)
        else:
            settle(True, result)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def run_on_own_thread(fn: Callable[..., T], *args: Any, name: str = "torch-once") -> T:
    """`fn(*args)` on a new thread, waited for; its exception is raised here."""
    outcome: list[tuple[bool, Any]] = []
    _start(fn, args, lambda ok, value: outcome.append((ok, value)), name).join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def on_own_thread(fn: Callable[..., T], *args: Any, name: str = "torch-once") -> asyncio.Future[T]:
    """`fn(*args)` on a new thread; a future of the running event loop that settles with it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        def apply() -> None:
            if future.done():  # the caller stopped waiting
                return
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

        loop.call_soon_threadsafe(apply)

    _start(fn, args, settle, name)
    return future
