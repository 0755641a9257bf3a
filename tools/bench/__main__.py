"""``python -m tools.bench``: the same as ``videorelay bench`` from a checkout."""

from tools.bench.runner import main

raise SystemExit(main())
