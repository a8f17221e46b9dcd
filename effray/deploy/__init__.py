"""Deployment: export (``.pt2``, ONNX, OpenVINO, int8), latency on the exported runtime,
batch inference on Ray Data, serving on Ray Serve.

``config`` holds the three commands' configs; ``model`` opens anything deployable
(:func:`effray.deploy.model.load_deployable`, which every entry point uses) through the
``runtimes``; ``export`` checks the files ``writers`` writes; ``latency`` times them, and
``probe`` does that for every trial of a search; ``batch`` scores what ``inputs`` reads;
``serve`` starts the ``replica`` that answers requests.

Importing the package registers ``probe`` with the search (:mod:`effray.search.deployed`),
which comes before deployment in the layers and so cannot import it.
"""

from effray.deploy import probe  # noqa: F401  (registers the search's deployed-latency measurement)
