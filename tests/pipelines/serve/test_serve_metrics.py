"""Metric calls of a request run after the answer is written, not before it (pipelines.serve.metrics._soon).

    .venv/bin/python -m pytest tests/pipelines/serve/test_serve_metrics.py -q

The end-to-end export of the series through Ray is tested in test_serve_api.py (Prometheus scrape).
"""

from __future__ import annotations

import asyncio

from pipelines.serve.metrics import _soon


def test_metric_calls_wait_for_the_ready_callbacks_and_run_at_once_without_a_loop():
    order: list[str] = []
    _soon(order.append, "no loop")  # a direct call (tests, scripts): recorded now
    assert order == ["no loop"]

    async def main():
        fut = asyncio.get_running_loop().create_future()

        async def handler():
            await fut
            order.append("answer written")  # what the request handler does when its output arrives

        task = asyncio.create_task(handler())
        await asyncio.sleep(0)  # the handler waits for its output
        fut.set_result(None)  # the output arrives: the handler is now ready to run
        _soon(lambda value, *, tag: order.append(f"{value} {tag}"), "metric", tag="route")
        assert order == ["no loop"]  # deferred, not recorded inline
        await task
        await asyncio.sleep(0)

    asyncio.run(main())
    assert order == ["no loop", "answer written", "metric route"]
