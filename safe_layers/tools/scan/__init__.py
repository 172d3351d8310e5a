"""``safe-layers scan``: :mod:`.command` runs it."""
