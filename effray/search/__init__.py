"""The compression search on Ray Tune: space, cost model, scheduler, trials, driver.

The package itself is callable: ``effray.search(teacher, data=..., space=...)`` is
:func:`effray.search.api.search`, the Python API of `effray tune`.
"""

from effray.registry import callable_package
from effray.search.api import search as search_api

callable_package(__name__, search_api)  # effray.search(teacher, data=..., space=...): the Python API
