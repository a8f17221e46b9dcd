"""`ray job submit --working-dir . -- python jobs/train.py --data DIR --model NAME --epochs E [...]`.

Same flags as `effray train`; joins the cluster the job runs on (RAY_ADDRESS), trains or
resumes the run named by --storage/--name, and prints one JSON line with the final
metrics and the checkpoint path. On a multi-node cluster --storage must be shared.
"""

import sys

from effray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
