"""``python -m pollserve`` and the ``pollserve`` script: the command line, with a Ctrl-C while it
starts up (most of it is importing modules) an exit status, not a traceback."""

import sys


def run() -> int:
    try:
        from .cli import main

        return main()
    except KeyboardInterrupt:
        # 128 + SIGINT, as a shell reports a command that Ctrl-C ended.  Once serving, the
        # server handles SIGINT itself (a clean shutdown, exit 0) and this is never reached.
        return 130


if __name__ == "__main__":
    sys.exit(run())
