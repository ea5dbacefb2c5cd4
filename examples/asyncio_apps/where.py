"""An ASGI app that says which loop serves it: a GET answers with the loop's class, its backend and the
process id, a WebSocket echoes each text message followed by the same.  uvicorn, hypercorn and
gunicorn's uvicorn worker serve it in docs/asyncio.md."""

import asyncio
import os


def where() -> str:
    loop = asyncio.get_running_loop()
    backend = getattr(loop, "backend", None)  # pollserve's loop has one; asyncio's and uvloop do not
    return f"{type(loop).__name__} {backend.name if backend else '-'} pid {os.getpid()}"


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif scope["type"] == "http":
        body = where().encode()
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    elif scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": f"{message.get('text')} {where()}"})
