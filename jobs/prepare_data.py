"""`ray job submit --working-dir . -- python jobs/prepare_data.py --source SRC --out DIR`.

Same flags as `effray data prepare`; joins the cluster the job runs on (RAY_ADDRESS).
"""

import sys

from effray.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "prepare", *sys.argv[1:]]))
