"""Every registered subcommand (and each of its arguments) has help text, and `good4cir --help` lists them all."""

from __future__ import annotations

import argparse

import pytest

from good4cir.cli import build_parser, main


def subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            return {name: (helps.get(name), sub) for name, sub in action.choices.items()}
    return {}


def test_every_subcommand_has_help_and_a_handler(capsys):
    parser = build_parser()
    commands = subcommands(parser)
    assert {"import", "export"} <= set(commands)
    for name, (help_text, sub) in commands.items():
        assert help_text and help_text.strip(), f"subcommand {name!r} has no help text"
        assert sub.get_default("handler") is not None, f"subcommand {name!r} sets no handler"
        for action in sub._actions:
            if action.dest != "help" and not isinstance(action, argparse._SubParsersAction):
                label = "/".join(action.option_strings) or action.dest
                assert action.help, f"{name} {label} has no help text"
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    listing = capsys.readouterr().out
    for name in commands:
        assert name in listing


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path):
    """`good4cir status | head -1`: the pipe closes before good4cir writes."""
    import os
    import subprocess
    import sys

    from test_retrieval_world import make_world_store

    db = make_world_store(tmp_path, pairs=4)
    for args in (["status", "--db", str(db)], ["status", "--db", str(db), "--json"]):
        proc = subprocess.Popen([sys.executable, "-m", "good4cir", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=tmp_path,
                                env={k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"})
        proc.stdout.close()
        err = proc.stderr.read().decode()
        proc.stderr.close()
        assert proc.wait(timeout=120) == 141, (args, err)
        assert "Traceback" not in err and "BrokenPipeError" not in err, (args, err)
