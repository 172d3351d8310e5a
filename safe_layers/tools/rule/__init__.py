"""``safe-layers rule``: :mod:`.command` runs it."""
