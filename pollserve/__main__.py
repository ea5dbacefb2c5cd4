"""``python -m pollserve`` and the ``pollserve`` script: the command line, with a Ctrl-C while it
starts up (most of it is importing modules) an exit status, not a traceback."""

import os
import sys


def run() -> int:
    try:
        from .cli import main

        status = main()
        sys.stdout.flush()  # here, so that a closed pipe is met below and not at exit
        return status
    except KeyboardInterrupt:
        # 128 + SIGINT, as a shell reports a command that Ctrl-C ended.  Once serving, the
        # server handles SIGINT itself (a clean shutdown, exit 0) and this is never reached.
        return 130
    except BrokenPipeError:
        # Output into a pipe whose reader has gone (`pollserve bench | head`): end quietly, as cat
        # does; stdout goes to /dev/null so that the flush at exit does not fail on it again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(run())
