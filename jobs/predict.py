"""`ray job submit --working-dir . -- python jobs/predict.py --model PATH --data DIR --out DIR [...]`.

Same flags as `effray predict`; joins the cluster the job runs on (RAY_ADDRESS), predicts
every image of --data on Ray Data (the model in an actor pool, one per GPU when the
cluster has GPUs) and prints one JSON line with the counts, images/s and, when the data
has labels, the accuracy. --out (absolute) gets predictions.parquet and skipped.parquet.
"""

import sys

from effray.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
