"""``safe-layers diagnose``: :mod:`.command` runs it."""
