"""The client of the examples: prints the answer to a GET of an http:// URL, or to the text "hi"
sent over a WebSocket to a ws:// URL (with the websockets package).

python ask.py http://127.0.0.1:8000/
python ask.py ws://127.0.0.1:8000/"""

import sys
import urllib.request


def ask(url: str) -> str:
    if url.startswith("ws://"):
        from websockets.sync.client import connect

        with connect(url, open_timeout=10) as websocket:
            websocket.send("hi")
            return str(websocket.recv(timeout=10))
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


if __name__ == "__main__":
    print(ask(sys.argv[1]))
