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


INTERRUPT_AT_START = """
import os, signal, sys

class CtrlC:  # a Ctrl-C that lands while the module named by G4C_CTRL_C_AT loads
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["G4C_CTRL_C_AT"]:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlC())
from good4cir.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("module, command, hint", [
    # the first second, while the subcommands register: a traceback from the imports
    ("good4cir.cli_store", ["status"], None),
    # the commands that can go on say how
    ("pipeline.runner", ["annotate", "--backend", "openai"], "rerun the same command to resume"),
    ("retrieval.train", ["train", "--out", "model"], "rerun the same command with --resume"),
    ("retrieval.index", ["index", "--checkpoint", "model", "--out", "index"], "rerun the same command"),
])
def test_ctrl_c_is_an_interruption_that_says_how_to_go_on(tmp_path, module, command, hint):
    import os
    import subprocess
    import sys

    db = tmp_path / "x.db"
    db.touch()
    proc = subprocess.run([sys.executable, "-c", INTERRUPT_AT_START, *command, "--db", str(db)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**{k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"},
                               "G4C_CTRL_C_AT": module})
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr and "interrupted" in proc.stderr, proc.stderr
    assert hint is None or hint in proc.stderr, proc.stderr


def test_every_command_names_a_missing_store_the_same_way(tmp_path):
    """A mistyped --db gets one message from every command that reads a store, saying how
    to make one (`import`; `demo-world` writes a folder, not a store), before torch or
    Gradio loads, and leaves no empty store behind."""
    missing = tmp_path / "typo" / "store.db"
    model = tmp_path / "model"
    commands = {
        "status": ["status", "--db", str(missing)],
        "export": ["export", "--db", str(missing), "--format", "jsonl", "--out", str(tmp_path / "x.jsonl")],
        "annotate": ["annotate", "--db", str(missing), "--backend", "simulator"],
        "score": ["score", "--db", str(missing)],
        "app": ["app", "--db", str(missing)],
        "train": ["train", "--db", str(missing), "--out", str(model), "--epochs", "1"],
        "eval": ["eval", "--db", str(missing), "--checkpoint", str(model)],
        "index": ["index", "--db", str(missing), "--checkpoint", str(model), "--out", str(tmp_path / "i")],
    }
    for name, args in commands.items():
        with pytest.raises(FileNotFoundError) as raised:
            main(args)
        assert str(raised.value) == f"{missing}: no such store; create one with `good4cir import`", name
        assert not missing.parent.exists(), name
    for command in (["train", "--out", str(model)], ["eval", "--checkpoint", str(model)]):
        with pytest.raises(FileNotFoundError) as raised:
            main([*command, "--data", str(tmp_path / "typo.jsonl")])
        assert str(raised.value).startswith(f"{tmp_path / 'typo.jsonl'}: no such file; --data takes"), command
    (tmp_path / "folder.db").mkdir()
    with pytest.raises(FileNotFoundError, match="a folder, not a store"):
        main(["status", "--db", str(tmp_path / "folder.db")])


def test_options_state_their_defaults_and_read_alike_across_commands():
    """`--help` is where a user learns a default: every option that has one says it; and
    an option several commands share is described in the same words, with the same
    placeholder (--checkpoint names train's folder everywhere but train, where it is a
    file of open_clip weights)."""
    commands = subcommands(build_parser())
    unstated = []
    by_option: dict[str, dict[str, argparse.Action]] = {}
    for name, (_, sub) in commands.items():
        for action in sub._actions:
            for option in action.option_strings:
                by_option.setdefault(option, {})[name] = action
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction)):
                continue
            if action.default is not None and action.default != [] and "default" not in (action.help or ""):
                unstated.append(f"{name} {'/'.join(action.option_strings)} (default {action.default!r})")
    assert not unstated, unstated
    for option in ("--threads", "--device"):
        helps = {name: action.help for name, action in by_option[option].items()}
        assert len(set(helps.values())) == 1, (option, helps)
    readers = {name: action.help for name, action in by_option["--db"].items()
               if name not in ("import", "train", "eval")}  # import creates it; train/eval repeat it
    assert set(readers.values()) == {"the store's SQLite file"}, readers
    folders = {name: (action.metavar, action.help) for name, action in by_option["--checkpoint"].items()
               if name != "train"}
    assert {metavar for metavar, _ in folders.values()} == {"DIR"}, folders
    assert all(help_text.startswith("a folder written by train") for _, help_text in folders.values()), folders
    assert {by_option["--index"][name].metavar for name in ("app", "query")} == {"DIR"}


def test_a_progress_bar_is_turned_off_with_the_same_flag_everywhere():
    """annotate's --no-progress; index took only --quiet (kept as its other name)."""
    commands = subcommands(build_parser())
    takes = {name for name, (_, sub) in commands.items()
             if any("--quiet" in a.option_strings or "--no-progress" in a.option_strings for a in sub._actions)}
    assert takes == {"annotate", "index"}
    for name in takes:
        sub = commands[name][1]
        assert any("--no-progress" in a.option_strings for a in sub._actions), name
    index = commands["index"][1]
    for flag in ("--no-progress", "--quiet"):
        assert index.parse_args(["--db", "d", "--checkpoint", "c", "--out", "o", flag]).quiet is True


def test_value_placeholders_are_short_words_not_argparse_defaults():
    """`--max-attempts MAX_ATTEMPTS`, `--base-url BASE_URL`: argparse's made-up placeholders
    (the option's name upper-cased) told nothing; a value reads as N, URL, SECONDS, ..."""
    made_up = []
    for name, (_, sub) in subcommands(build_parser()).items():
        for action in sub._actions:
            if action.option_strings and action.nargs != 0 and action.metavar is None \
                    and action.choices is None and "_" in action.dest:
                made_up.append(f"{name} {action.option_strings[0]}")
    assert not made_up, made_up


def test_log_records_print_as_the_commands_notes_do():
    # open_clip logs on the root logger while building a model; before, that set Python's
    # 'WARNING:root:...' and every later record came as 'WARNING:retrieval.train:...'
    import subprocess
    import sys

    code = ("import logging; from good4cir.cli import configure_logging; configure_logging(); "
            "logging.warning('No pretrained weights loaded'); "
            "logging.getLogger('retrieval.train').warning('image left out: %s', 'a.png'); "
            "logging.getLogger('retrieval.train').info('not shown')")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert err == "warning: No pretrained weights loaded\nwarning: image left out: a.png\n"
