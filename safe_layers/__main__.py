"""``python -m safe_layers``: the ``safe-layers`` command, for a Python whose scripts
folder is not on PATH."""

from safe_layers.tools.cli import entry_point

if __name__ == "__main__":
    entry_point()
