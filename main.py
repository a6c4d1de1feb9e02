"""courtbot's entry point: ``python main.py <command>`` (CONTRACT section 1).

The commands are in ``cli.py``, the daemon in ``daemon.py``. This file stays this small on
purpose: Python keeps the syntax tree of the script it runs until the script ends, and for the
daemon that is forever (the 2,300 lines of the CLI held about 4.5 MB at rest this way: see
"Memory and reload" in docs/performance.md). An imported module's tree is freed once compiled.
"""

import gc

# The imports make no garbage worth collecting: the collector's passes over what they build took
# a tenth of their time, for every command and for the daemon's start. cli.main turns it on.
gc.disable()
import cli  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(cli.main())
