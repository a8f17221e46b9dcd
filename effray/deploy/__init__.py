"""Deployment: export (``.pt2``, ONNX, int8), batch inference on Ray Data, serving on Ray Serve.

Every entry point opens its model through :func:`effray.deploy.model.load_deployable`.
"""
