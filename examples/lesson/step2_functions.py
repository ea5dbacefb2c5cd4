"""Step 2: the same server split into accept_connection() and send_message().

It reads better, but it is still not asynchronous: the two functions are
coupled.  accept_connection() calls send_message(), and send_message() does
not return until its client leaves, so while it runs nobody calls accept()
and the second client still waits.  To serve two clients at once something
outside both functions must decide which one runs next, and it can only
decide well if it knows which socket is ready: that is step 3's select().

    python examples/lesson/step2_functions.py --port 5001
"""

from __future__ import annotations

import socket

from shared import HELLO, listen, option_parser


def accept_connection(server: socket.socket, reply: bytes) -> None:
    client, _ = server.accept()
    send_message(client, reply)  # the coupling: accepting a client means serving it until it leaves


def send_message(client: socket.socket, reply: bytes) -> None:
    while True:
        request = client.recv(1024)
        if not request:
            break
        client.send(reply)
    client.close()


def main() -> None:
    options = option_parser(__doc__).parse_args()
    reply = HELLO * options.repeat
    server = listen(options.host, options.port)
    while True:
        accept_connection(server, reply)


if __name__ == "__main__":
    main()
