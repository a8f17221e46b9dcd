"""`ray job submit --working-dir . -- python jobs/sensitivity.py --teacher CKPT --data DIR --out DIR [...]`.

Same flags as `effray sensitivity`; joins the cluster the job runs on (RAY_ADDRESS), probes
every conv/linear layer of the teacher as Ray tasks spread over the cluster's nodes, and
prints one JSON line with the baseline and each layer's worst setting. On a multi-node
cluster --out must be on shared storage.
"""

import sys

from effray.cli import main

if __name__ == "__main__":
    sys.exit(main(["sensitivity", *sys.argv[1:]]))
