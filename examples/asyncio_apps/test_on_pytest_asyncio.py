"""A pytest-asyncio test on pollserve's loop (the factory is in conftest.py)."""

import asyncio

import pytest


@pytest.mark.asyncio
async def test_runs_on_pollserve() -> None:
    loop = asyncio.get_running_loop()
    assert type(loop).__name__ == "AsyncioLoop", loop
    print(f"\non {type(loop).__name__} {loop.backend.name}")
