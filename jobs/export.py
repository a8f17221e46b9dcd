"""`ray job submit --working-dir . -- python jobs/export.py ...`: same flags as `effray export`."""

import sys

from effray.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
