"""`ray job submit --working-dir . -- python jobs/serve.py --model PATH [--host 0.0.0.0 --port 8000 --replicas N]`.

Same flags as `effray serve`; joins the cluster the job runs on (RAY_ADDRESS), serves the
model on Ray Serve (POST /predict, GET /healthz) until `ray job stop` (SIGINT) ends the
job, then shuts Serve down and prints one JSON line. Binds 127.0.0.1 unless --host says
otherwise; the endpoint has no authentication of its own.
"""

import sys

from effray.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
