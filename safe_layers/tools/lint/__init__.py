"""``safe-layers lint``: :mod:`.command` runs it, :mod:`.rules` holds its rules, a module
per family."""
