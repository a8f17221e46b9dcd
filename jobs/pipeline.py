"""`ray job submit --working-dir . -- python jobs/pipeline.py ...`: same flags as `effray run`."""

import sys

from effray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
