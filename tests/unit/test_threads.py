"""engine/threads.py: torch work off the step loop runs on a thread that has ended when it is done."""

import asyncio
import threading

import pytest

from serve_app.engine.threads import on_own_thread, run_on_own_thread


def where() -> threading.Thread:
    return threading.current_thread()


def test_runs_on_a_new_thread_that_has_ended_when_it_returns():
    thread = run_on_own_thread(where, name="probe")
    assert thread is not threading.current_thread() and thread.name == "probe"
    assert not thread.is_alive()
    assert run_on_own_thread(divmod, 7, 2) == (3, 1)


def test_its_exception_is_raised_to_the_caller():
    with pytest.raises(ZeroDivisionError):
        run_on_own_thread(divmod, 1, 0)


def test_the_async_form_settles_on_the_event_loop():
    async def main():
        thread = await on_own_thread(where)
        assert thread is not threading.current_thread()
        with pytest.raises(KeyError):
            await on_own_thread({}.__getitem__, "missing")

    asyncio.run(main())


def test_a_caller_that_stopped_waiting_is_not_an_error():
    release = threading.Event()
    errors = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        future = on_own_thread(release.wait, 5)
        future.cancel()
        release.set()
        await asyncio.sleep(0.2)  # the thread settles after the cancel

    asyncio.run(main())
    assert errors == []
