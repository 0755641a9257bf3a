"""``videorelay bench``: the service's hot paths measured against baselines taken in the same run.

One module per scenario (``webhook``, ``download``, ``reconciler``, ``submit``, ``e2e``), a
``runner`` that parses the command line and runs them in order, and a ``report`` that prints
the Markdown table and writes the JSON. Load comes from separate processes (``loadgen``),
servers run as uvicorn subprocesses on 127.0.0.1, and every run is bounded in time.
"""

from __future__ import annotations

__all__: list[str] = []
