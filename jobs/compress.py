"""`ray job submit --working-dir . -- python jobs/compress.py --teacher CKPT --data DIR --out DIR [...]`.

Same flags as `effray compress`; joins the cluster the job runs on (RAY_ADDRESS),
compresses the teacher with fine-tuning on Ray Train, and prints one JSON line with the
artifact's measurements. On a multi-node cluster --out must be on shared storage.
"""

import sys

from effray.cli import main

if __name__ == "__main__":
    sys.exit(main(["compress", *sys.argv[1:]]))
