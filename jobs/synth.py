"""`ray job submit --working-dir . -- python jobs/synth.py train|sample|score [...]`.

Same flags as `effray synth train|sample|score`; joins the cluster the job runs on
(RAY_ADDRESS), trains (or resumes) the GAN, samples a synthetic dataset, or scores
one, and prints one JSON line with the results. On a multi-node cluster --out must be
on shared storage.
"""

import sys

from effray.cli import main

if __name__ == "__main__":
    sys.exit(main(["synth", *sys.argv[1:]]))
