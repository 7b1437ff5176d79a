"""The server's event-loop waker: events set from other threads, with at most one wake-up
scheduled on the loop however many are due (the engine delivers to every request each call)."""

import asyncio
import threading

from realm_jax.server.wakeup import LoopWaker


def test_many_wakes_from_a_thread_set_every_event_with_few_loop_callbacks():
    async def main():
        loop = asyncio.get_running_loop()
        scheduled = []
        real = loop.call_soon_threadsafe

        def counting(cb, *args):
            scheduled.append(cb)
            return real(cb, *args)

        loop.call_soon_threadsafe = counting
        waker = LoopWaker(loop)
        events = [asyncio.Event() for _ in range(64)]

        def engine_round():  # one delivery round: every request's callback, back to back
            for e in events:
                waker.wake(e)

        t = threading.Thread(target=engine_round)
        t.start()
        t.join()  # the loop has not run meanwhile: one callback holds all 64
        assert len(scheduled) == 1
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 5)
        for e in events:
            e.clear()
        t = threading.Thread(target=engine_round)  # a second round schedules again
        t.start()
        t.join()
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 5)
        assert len(scheduled) == 2

    asyncio.run(main())


def test_a_wake_after_the_loop_closed_is_dropped():
    loop = asyncio.new_event_loop()
    waker = LoopWaker(loop)
    loop.close()
    e = asyncio.Event()
    waker.wake(e)  # no error: nobody waits any more
    assert not e.is_set()
