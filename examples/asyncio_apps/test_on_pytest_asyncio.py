"""pytest-asyncio tests on pollserve's loop (the factory is in conftest.py): an async fixture's server
and the test that talks to it share the loop."""

import asyncio

import pytest
import pytest_asyncio


@pytest_asyncio.fixture
async def echo_server():
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(100))
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    yield server
    server.close()
    await server.wait_closed()


@pytest.mark.asyncio
async def test_runs_on_pollserve(echo_server: asyncio.Server) -> None:
    loop = asyncio.get_running_loop()
    assert type(loop).__name__ == "AsyncioLoop" and echo_server.get_loop() is loop
    reader, writer = await asyncio.open_connection(*echo_server.sockets[0].getsockname())
    writer.write(b"hi")
    assert await reader.read() == b"hi"
    writer.close()
    print(f"\non {type(loop).__name__} {loop.backend.name}")
