"""``safe-layers harden``: :mod:`.command` runs it."""
