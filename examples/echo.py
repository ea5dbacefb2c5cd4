# examples/echo.py
async def handler(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
