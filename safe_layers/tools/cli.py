"""``safe-layers``: the console command; one subcommand per module of this package.

    safe-layers lint solver.prototxt
    safe-layers harden train_val.prototxt -o hardened.prototxt

Exit status: 0 clean (or warnings only), 1 a problem found, 2 unreadable input or a bad
command line (argparse's own usage errors exit 2 as well).
"""

import argparse
import importlib
import signal
import sys

from safe_layers.core.errors import InputError
from safe_layers.tools.findings import EXIT_INPUT

# Subcommand -> the module of its command (safe_layers.tools.NAME.command); each defines
# HELP, add_arguments and run, and its docstring is the subcommand's --help.
SUBCOMMANDS = ("diagnose", "lint", "harden", "scan", "train", "rule")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="safe-layers",
        description="Find and fix what makes Caffe training go NaN: before training (lint, harden), "
                    "during it (train) and after it (diagnose, scan).")
    from safe_layers import __version__
    parser.add_argument("--version", action="version", version="safe-layers " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        module = importlib.import_module("safe_layers.tools.%s.command" % name)
        sub = commands.add_parser(name, help=module.HELP, description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except InputError as exc:
        sys.stderr.write("safe-layers %s: error: %s\n" % (args.command, exc))
        return EXIT_INPUT
    except OSError as exc:
        # A file the command had to read or write and could not, that no check before
        # caught (a full disk, a permission): what and where, exit 2, no traceback.
        if isinstance(exc, BrokenPipeError):
            # `safe-layers ... | head`: stop quietly, as Unix tools do.
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            return 1
        where = " %s" % exc.filename if getattr(exc, "filename", None) else ""
        sys.stderr.write("safe-layers %s: error:%s: %s\n" % (args.command, where, exc.strerror or exc))
        return EXIT_INPUT


def entry_point():
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
