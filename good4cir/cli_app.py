"""`good4cir app`: the review app (Gradio) over a store."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(subparsers) -> None:
    app = subparsers.add_parser(
        "app",
        help="open the review app: review, flag and edit captions, run the pipeline, stats, export, retrieve",
        description=(
            "Serve the good4cir review app for a store. It listens on 127.0.0.1 by default; "
            "any other --host requires --auth. Reviewers are the logged-in users, or the "
            "name typed in the Reviewer box when there is no login."
        ),
    )
    app.add_argument("--db", required=True, type=Path, help="the store's SQLite file")
    app.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    app.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    app.add_argument(
        "--auth",
        help="USER:PASSWORD (seen by other users of this machine in ps), or a file with one "
             "user:password per line; required for a non-local --host",
    )
    app.add_argument("--index", type=Path, metavar="DIR",
                     help="a folder written by index, for the Retrieve tab")
    app.set_defaults(handler=run_app)


def run_app(args: argparse.Namespace) -> int:
    from ui.security import SecurityError, check_bind, parse_auth

    from .cli import CommandError, require_store

    require_store(args.db)
    from store import open_db

    open_db(args.db).conn.close()  # a file that is not a store fails here, before Gradio loads
    try:
        auth = parse_auth(args.auth)
        check_bind(args.host, auth)
    except SecurityError as exc:
        raise CommandError(str(exc)) from None
    if auth and not os.path.isfile(args.auth):
        # A command line is anyone's to read on this machine (ps, /proc/PID/cmdline).
        print("warning: the password given in --auth is visible to other users of this machine (ps); "
              "put user:password lines in a file only you can read and pass --auth FILE", file=sys.stderr)
    elif auth and os.name == "posix" and os.stat(args.auth).st_mode & 0o044:
        print(f"warning: {args.auth} holds passwords and is visible to other users of this machine; "
              f"make it a file only you can read (chmod 600 {args.auth})", file=sys.stderr)
    if args.index is not None and not args.index.exists():
        raise CommandError(f"index {args.index} does not exist: build it with `good4cir index`")

    from ui.server import serve

    serve(args.db, host=args.host, port=args.port, auth=auth,
          index_path=str(args.index) if args.index else None)
    return 0
