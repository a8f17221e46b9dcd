"""`ray job submit --working-dir . -- python jobs/clean_data.py --data DIR --out DIR [--drop duplicates,leaks,labels]`.

Same flags as `effray data clean`; joins the cluster the job runs on (RAY_ADDRESS).
"""

import sys

from effray.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "clean", *sys.argv[1:]]))
