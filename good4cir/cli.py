"""`good4cir` command line: parses arguments, calls one library function, reports errors.

Each area registers its subcommands from its own module (cli_store, cli_pipeline,
cli_retrieval, cli_app) so that the heavy imports (torch, gradio) happen only when
their command runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__

AREAS = ("cli_demo", "cli_store", "cli_pipeline", "cli_score", "cli_retrieval", "cli_index", "cli_app")


class CommandError(Exception):
    """A user-facing failure: printed as 'error: ...' with exit status 1."""


def require_store(db_path) -> None:
    """Refuse a --db that names no store file, in the same words for every command that
    reads one (opening it would create an empty store at a typo)."""
    from pathlib import Path

    path = Path(db_path)
    if path.is_dir():
        raise FileNotFoundError(f"{db_path}: a folder, not a store; --db takes the SQLite file "
                                "that `good4cir import` writes")
    if not path.is_file():
        raise FileNotFoundError(f"{db_path}: no such store; create one with `good4cir import`")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="good4cir",
        description="Generate, review, export and train on Composed Image Retrieval captions.",
    )
    parser.add_argument("--version", action="version", version=f"good4cir {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for area in AREAS:
        try:
            module = importlib.import_module(f"good4cir.{area}")
        except ModuleNotFoundError as exc:
            if exc.name == f"good4cir.{area}":
                continue  # that area is not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    restore = _stop_on_termination()
    try:
        return _main(argv)
    finally:
        restore()


def _main(argv: list[str] | None) -> int:
    args = None
    try:
        # Inside the try: a Ctrl-C in the first second (the imports) is an interruption
        # like any other, not a traceback
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "handler", None):
            parser.print_help()
            return 0
        result = args.handler(args)
        sys.stdout.flush()  # here, so a reader gone away is caught below, not at exit
    except BrokenPipeError:
        # The reader of the output left (`good4cir status | head -1`): stop quietly, as
        # Unix tools do. Writes already stored stay stored; nothing else is printed, and
        # stdout goes to /dev/null so the interpreter's own flush at exit cannot fail.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it
    except KeyboardInterrupt:
        hint = getattr(args, "on_interrupt", None)  # how to go on, where the command can
        # A command that undid its work (a new store left empty) says so instead
        note = getattr(args, "interrupted_note", None)
        try:  # after a SIGHUP the terminal may be gone
            print(note or "interrupted; everything finished so far is saved" + (f"; {hint}" if hint else ""),
                  file=sys.stderr)
        except OSError:
            pass
        return 130
    except Exception as exc:  # turned into a clear message, unless under pytest
        if os.environ.get("GOOD4CIR_RAISE") or "PYTEST_CURRENT_TEST" in os.environ:
            raise
        if isinstance(exc, (CommandError,)) or _is_user_error(exc):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise
    return int(result or 0)


class _LevelPrefix(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {super().format(record)}"


def configure_logging() -> None:
    """Log records print as the commands' own notes do ('warning: ...'). Without this the
    first library to log on the root logger (open_clip does, while building a model) set
    Python's default 'WARNING:name:...', so a run's warnings came in two formats. A
    process that configured logging already (pytest, an embedding program) keeps its own."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(_LevelPrefix("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


def _stop_on_termination():
    """Take SIGTERM (`kill PID`, `timeout`, a container or service stop) and SIGHUP (the
    terminal closed) as Ctrl-C, so that every command stops as it does on Ctrl-C (a
    temporary file removed, an annotation run's calls in flight stored) instead of the
    process ending at once. A signal already ignored (nohup) stays ignored. Returns the
    function that puts the previous handlers back."""
    import signal
    import threading

    owner = os.getpid()

    def interrupt(signum, frame):
        if os.getpid() != owner:
            # A forked worker (demo-world's renderers, a DataLoader's) inherits this handler;
            # its pool ends it with SIGTERM, which must end it as by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for name in ("SIGTERM", "SIGHUP"):
            sig = getattr(signal, name, None)
            if sig is not None and signal.getsignal(sig) not in (signal.SIG_IGN, None):
                previous[sig] = signal.signal(sig, interrupt)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _is_user_error(exc: Exception) -> bool:
    from store.errors import StoreError

    return isinstance(exc, (StoreError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
