"""`ray job submit --working-dir . -- python jobs/tune_compression.py ...`: same flags as `effray tune`."""

import sys

from effray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
