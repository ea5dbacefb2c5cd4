"""Step 1: a blocking hello server, one client at a time.

Every call here blocks: accept() until a client connects, recv() until that
client sends, send() until the kernel has taken the reply.  While one client
stays connected the server sits in its recv(), so the second client's
connection waits in the kernel's backlog until the first one leaves.

    python examples/lesson/step1_blocking.py --port 5001
"""

from __future__ import annotations

from shared import HELLO, listen, option_parser


def main() -> None:
    options = option_parser(__doc__).parse_args()
    reply = HELLO * options.repeat
    server = listen(options.host, options.port)
    while True:
        client, _ = server.accept()  # blocks until a client connects
        while True:
            request = client.recv(1024)  # blocks until this client sends something
            if not request:  # b"": the client closed its side
                break
            client.send(reply)  # blocks until the kernel has taken the whole reply
        client.close()


if __name__ == "__main__":
    main()
