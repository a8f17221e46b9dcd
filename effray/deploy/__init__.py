"""Deployment: export (``.pt2``, ONNX, int8), batch inference on Ray Data, serving on Ray Serve.

``config`` holds the three commands' configs; ``model`` opens anything deployable
(:func:`effray.deploy.model.load_deployable`, which every entry point uses); ``export``
checks the files ``writers`` writes; ``batch`` scores what ``inputs`` reads; ``serve``
starts the ``replica`` that answers requests.
"""
