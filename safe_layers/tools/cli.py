"""``safe-layers``: the console command; one subcommand per module of this package.

    safe-layers lint solver.prototxt
    safe-layers harden train_val.prototxt -o hardened.prototxt

Exit status: 0 clean (or warnings only), 1 a problem found, 2 unreadable input or a bad
command line (argparse's own usage errors exit 2 as well).
"""

import argparse
import importlib
import importlib.util
import os
import signal
import sys

from safe_layers import __version__
from safe_layers.core.errors import InputError
from safe_layers.readers import prototxt
from safe_layers.tools.findings import EXIT_INPUT

# Subcommand -> the module of its command (safe_layers.tools.NAME.command); each defines
# HELP, add_arguments and run, and its docstring is the subcommand's --help.
# The status of a process ended by SIGPIPE (128 + 13), for a closed output pipe.
EXIT_PIPE_CLOSED = 128 + signal.SIGPIPE
# ... and by SIGINT (a Ctrl-C), as a shell reports it.
EXIT_INTERRUPTED = 128 + signal.SIGINT

SUBCOMMANDS = ("diagnose", "lint", "harden", "scan", "train", "rule")

# The modules of the tools extra (pyproject.toml's optional-dependencies "tools", by the
# names they import as): every subcommand but `rule` needs them; the layers do not.
TOOLS_EXTRA = {"google.protobuf": "protobuf", "lmdb": "lmdb", "plyvel": "plyvel", "h5py": "h5py",
               "tqdm": "tqdm", "matplotlib": "matplotlib"}
if sys.version_info < (3, 11):
    TOOLS_EXTRA["tomli"] = "tomli"  # lint's [tool.safe-layers]: Python has tomllib from 3.11
NEEDS_NO_EXTRA = ("rule",)
# The subcommands that only read Caffe's formats and never run Caffe: without pycaffe they
# read with the schema bundled with safe_layers (Caffe's own caffe.proto).
READ_WITHOUT_CAFFE = ("diagnose", "scan")


def missing_tools_extra(command):
    """The one line saying which packages of the tools extra ``command`` lacks, or None."""
    if command in NEEDS_NO_EXTRA:
        return None
    missing = [dist for module, dist in TOOLS_EXTRA.items() if not _importable(module)]
    if not missing:
        return None
    return ("safe-layers %s needs the tools extra, and this Python lacks %s: "
            "pip install 'safe_layers[tools]'" % (command, ", ".join(missing)))


def _importable(module):
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def build_parser():
    parser = argparse.ArgumentParser(
        prog="safe-layers",
        description="Find and fix what makes Caffe training go NaN: before training (lint, harden), "
                    "during it (train) and after it (diagnose, scan).")
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
    argv = sys.argv[1:] if argv is None else list(argv)
    # The subcommand's name for messages, before argparse has said it (an action such as
    # --list-rules prints while the arguments are parsed).
    command = next((a for a in argv if a in SUBCOMMANDS), "")
    try:
        return _main(argv, command)
    except KeyboardInterrupt:
        # A Ctrl-C before a command has its own handling (`train` has, from the start
        # of its run): one line, and the status of a process SIGINT ended, no traceback.
        sys.stderr.write("safe-layers%s: interrupted\n" % (" " + command if command else ""))
        return EXIT_INTERRUPTED


def _main(argv, command):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        missing = missing_tools_extra(args.command)
        if missing:
            sys.stderr.write("safe-layers %s: error: %s\n" % (command, missing))
            return EXIT_INPUT
        if args.command in READ_WITHOUT_CAFFE:
            prototxt.allow_bundled_schema()
        status = args.run(args)
        # Written out here, inside the try: a full disk behind stdout is an error of
        # this command's, not a message lost at exit with status 0.
        sys.stdout.flush()
        return status
    except InputError as exc:
        sys.stderr.write("safe-layers %s: error: %s\n" % (command, exc))
        return EXIT_INPUT
    except OSError as exc:
        # A file the command had to read or write and could not, that no check before
        # caught (a full disk, a permission): what and where, exit 2, no traceback.
        if isinstance(exc, BrokenPipeError):
            # `safe-layers ... | head`: stop quietly with the status of a process SIGPIPE
            # ended, as Unix tools do; 1 would say "found an error".
            _drop_stdout()
            return EXIT_PIPE_CLOSED
        where = exc.filename if getattr(exc, "filename", None) else None
        sys.stderr.write("safe-layers %s: error: %s%s\n" % (
            command, "%s: " % where if where else "cannot write: ", exc.strerror or exc))
        _drop_stdout()
        return EXIT_INPUT


def _drop_stdout():
    """Point stdout at /dev/null: what could not be written must not be retried (and fail
    again, with a traceback) when the interpreter flushes at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def entry_point():
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
