"""The ASGI app bench_uvicorn.py serves: a fixed small body, as small as an ASGI app gets, so that what
is measured is the server and its loop."""

BODY = b"Hello world\n"
START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode())],
}
RESPONSE = {"type": "http.response.body", "body": BODY}


async def app(scope, receive, send):
    if scope["type"] != "http":  # lifespan: nothing to set up
        return
    await send(START)
    await send(RESPONSE)
