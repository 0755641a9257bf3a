"""Everything videorelay knows about hiapi: wire shapes, input rules, errors, and a client.

Nothing in this package knows about our database; the simulator depends on it too.
"""
