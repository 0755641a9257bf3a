"""HTTP routes. Thin: they parse, call lifecycle/jobs, and render; no SQL here."""
