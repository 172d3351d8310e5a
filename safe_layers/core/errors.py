"""Input a tool cannot read."""


class InputError(Exception):
    """Input the tool cannot read: a missing file, a prototxt protobuf cannot parse, a
    truncated log, a corrupt database. The message says what and where
    (``path:line:col: ...`` when a position is known); the CLI prints it and exits 2."""
