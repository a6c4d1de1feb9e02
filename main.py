"""courtbot's entry point: ``python main.py <command>`` (CONTRACT section 1).

The commands are in ``cli.py``, the daemon in ``daemon.py``. This file stays this small on
purpose: Python keeps the syntax tree of the script it runs until the script ends, and for the
daemon that is forever (the 2,300 lines of the CLI held about 4.5 MB at rest this way: see
"Memory and reload" in docs/performance.md). An imported module's tree is freed once compiled.
"""

import sys

import cli

if __name__ == "__main__":
    sys.exit(cli.main())
