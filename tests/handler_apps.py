"""``async def`` apps loaded by the end-to-end tests through ``--app handler_apps:NAME`` (and the
shapes that are not apps, which the command refuses)."""

import asyncio
import functools
import os
import sys
import time


async def echo(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


async def tagged_echo(reader, writer, tag=b""):
    """Echoes each chunk after ``tag``: shows which shape of the handler ran."""
    while data := await reader.read(65536):
        writer.write(tag + data)
        await writer.drain()


#: a functools.partial of a coroutine function
partial_echo = functools.partial(tagged_echo, tag=b"partial:")


class ObjectEcho:
    """An object whose __call__ is async def."""

    async def __call__(self, reader, writer):
        await tagged_echo(reader, writer, tag=b"object:")


object_echo = ObjectEcho()


def said(what: str) -> None:
    """A line on the server's stderr, which the tests read."""
    print(what, file=sys.stderr, flush=True)


def client(writer) -> str:
    host, port = writer.get_extra_info("peername")[:2]
    return f"{host}:{port}"


async def peer(reader, writer):
    """Answers each chunk with ``HOST PORT`` of the peer the handler sees, and the worker's pid."""
    while await reader.read(100):
        host, port = writer.get_extra_info("peername")[:2]
        writer.write(f"{host} {port} {os.getpid()}\n".encode())


async def greet_then_wait(reader, writer):
    """``ready``, then one read; says what that read returned (EOF at the idle timeout, at a shutdown)."""
    writer.write(b"ready\n")
    await writer.drain()
    data = await reader.read(100)
    said(f"handler saw {data!r} from {client(writer)}")


async def fails(reader, writer):
    """Raises on ``boom``; echoes anything else."""
    while data := await reader.read(100):
        if data == b"boom":
            raise ValueError("handler bug")
        writer.write(data)


async def slow_reply(reader, writer):
    """On a request: ``part1``, and half a second later ``part2``; a shutdown comes in between."""
    await reader.read(100)
    writer.write(b"part1")
    await writer.drain()
    await asyncio.sleep(0.5)
    writer.write(b"part2")


async def stubborn(reader, writer):
    """``ready``, then sleeps past any shutdown timeout; says when it is cancelled."""
    writer.write(b"ready\n")
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        said(f"handler for {client(writer)} cancelled")
        raise


async def blocker(reader, writer):
    """Holds the loop for 0.3 s on each request (a blocking call in a coroutine), then answers."""
    while await reader.read(100):
        time.sleep(0.3)
        writer.write(b"done\n")


async def tls_version(reader, writer):
    """Answers each chunk with the TLS version of the connection."""
    while await reader.read(100):
        writer.write(writer.get_extra_info("ssl_object").version().encode() + b"\n")


async def half_close(reader, writer):
    """writelines() and write_eof() (the calls pollserve's transport gets from StreamTransport), then
    reads on until the client's EOF and waits for the close."""
    data = await reader.read(100)
    writer.writelines([data, b"|", str(writer.can_write_eof()).encode()])
    writer.write_eof()
    rest = await reader.read()
    said(f"after write_eof the handler read {rest!r}")
    writer.close()
    await writer.wait_closed()
    said("closed")


# -- not apps: each is refused with one line ---------------------------------------------------------


def sync_two_arguments(reader, writer):
    """A handler without async."""


async def one_argument(reader):
    """A coroutine function that cannot take (reader, writer)."""


async def generator(reader, writer):
    """An async generator function."""
    yield


class NeedsArguments:
    """A class whose instances need arguments: no protocol factory."""

    def __init__(self, name):
        self.name = name


NOT_CALLABLE = 42
