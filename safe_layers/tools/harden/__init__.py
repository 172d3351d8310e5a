"""``safe-layers harden``: :mod:`.command` runs it.

    command        the command line (--help is its docstring) and the atomic file write
    hardener       Hardener: plans every edit of one net's text, applies them, sums up
    placement      where guards and clips go (the default placement, --guard)
    swaps          --swap batchnorm / infogain
    strip          --strip: Stripper, harden's blocks out and its swaps undone
    param_strings  the param_str harden writes, and recognising its own layers again
    text_edits     byte-preserving edits of a prototxt's text
"""
