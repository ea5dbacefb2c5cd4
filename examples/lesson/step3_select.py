"""Step 3: a select() event loop with accept_connection() and send_message() as its handlers.

The loop asks the kernel which sockets are ready and calls the handler of
each; a handler does one step and returns.  Many clients are served at once
now.  This is where the classic lesson stops, and what it leaves out is what
run.py shows breaking:

- send() is still blocking and nothing is buffered: a reply larger than the
  kernel's socket buffer, to a client that does not read it, blocks send(),
  and with it the loop and every other client;
- no limits: select() takes only fds below FD_SETSIZE (1024), so once a
  client's fd reaches 1024 (about the 1020th client) the next select()
  raises ValueError and the server dies; at the fd limit accept() raises
  OSError (EMFILE) and it dies too;
- no signal handling: SIGTERM kills it mid-reply.

    python examples/lesson/step3_select.py --port 5001
"""

from __future__ import annotations

import socket
from select import select

from shared import HELLO, listen, option_parser


def accept_connection(server: socket.socket, to_monitor: list[socket.socket]) -> None:
    client, _ = server.accept()  # EMFILE here, at the fd limit, ends the loop
    to_monitor.append(client)


def send_message(client: socket.socket, to_monitor: list[socket.socket], reply: bytes) -> None:
    request = client.recv(1024)
    if request:
        client.send(reply)  # blocks the whole loop until the kernel has taken the reply
    else:
        to_monitor.remove(client)
        client.close()


def event_loop(server: socket.socket, reply: bytes) -> None:
    to_monitor = [server]
    while True:
        # ValueError ("filedescriptor out of range in select()") once any fd is >= FD_SETSIZE
        ready_to_read, _, _ = select(to_monitor, [], [])
        for sock in ready_to_read:
            if sock is server:
                accept_connection(server, to_monitor)
            else:
                send_message(sock, to_monitor, reply)


def main() -> None:
    options = option_parser(__doc__).parse_args()
    reply = HELLO * options.repeat
    server = listen(options.host, options.port)
    event_loop(server, reply)


if __name__ == "__main__":
    main()
