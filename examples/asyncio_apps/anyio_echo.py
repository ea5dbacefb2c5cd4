"""anyio on pollserve's loop: ``anyio.run()`` passes its asyncio backend's ``loop_factory`` option on to
``asyncio.Runner``.  An echo over TCP on 127.0.0.1, and the loop it ran on."""

import asyncio

import anyio
import anyio.abc

import pollserve


async def main() -> str:
    async def echo(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.send(await stream.receive())

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as group:
        group.start_soon(listener.serve, echo)
        async with await anyio.connect_tcp("127.0.0.1", port) as client:
            await client.send(b"hi")
            answer = await client.receive()
        group.cancel_scope.cancel()
    loop = asyncio.get_running_loop()
    return f"{answer.decode()} {type(loop).__name__} {loop.backend.name}"


if __name__ == "__main__":
    print(anyio.run(main, backend="asyncio", backend_options={"loop_factory": pollserve.new_event_loop}))
