"""The README's first job, command by command as a user copies it, on a small demo world:
the exit statuses and files it names, and output fit for a log (no progress bars when
stderr is not a terminal, as a script or `make demo > log` runs them)."""

from __future__ import annotations

import json

from good4cir.cli import main


def test_generate_and_score_as_the_readme_says(tmp_path, capsys):
    world, db = tmp_path / "world", tmp_path / "data.db"
    assert main(["demo-world", "--out", str(world), "--pairs", "12", "--seed", "3", "--workers", "1"]) == 0
    assert {p.name for p in world.iterdir()} == {"images", "pairs.jsonl", "scenes.jsonl", "world.json"}
    assert main(["import", "--db", str(db), "--format", "pairs", str(world)]) == 0
    assert main(["annotate", "--db", str(db), "--backend", "simulator", "--dry-run"]) == 0
    assert main(["annotate", "--db", str(db), "--backend", "simulator", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert main(["status", "--db", str(db), "--json"]) == 0
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    assert (run["backend"], run["model"], run["pairs_done"], run["pairs_failed"]) == ("simulator", "simulator-v1", 12, 0)
    assert main(["score", "--db", str(db), "--run", "1", "--plot", str(tmp_path / "runs.png")]) == 0
    assert (tmp_path / "runs.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["export", "--db", str(db), "--format", "jsonl", "--out", str(tmp_path / "d.jsonl"),
                 "--include-unreviewed"]) == 0
    assert len((tmp_path / "d.jsonl").read_text().splitlines()) == 12
    err += capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err and "pair/s" not in err, err


def test_status_names_each_run(tmp_path, capsys):
    """Two runs annotated with --name r02 and --name r05 (error rates 0.2 and 0.5) read
    '1  simulator  simulator-v1  finished ...' and '2  simulator ...' in status: the names
    that score and the app show were in neither the table nor --json."""
    world, db = tmp_path / "world", tmp_path / "data.db"
    assert main(["demo-world", "--out", str(world), "--pairs", "6", "--seed", "3", "--workers", "1"]) == 0
    assert main(["import", "--db", str(db), "--format", "pairs", str(world)]) == 0
    for name, rate in (("r02", "0.2"), ("r05", "0.5")):
        assert main(["annotate", "--db", str(db), "--backend", "simulator", "--error-rate", rate, "--name", name,
                     "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["status", "--db", str(db)]) == 0
    header, first, second = capsys.readouterr().out.splitlines()[:3]
    assert header.split()[:3] == ["run", "name", "backend"]
    assert first.split()[:3] == ["1", "r02", "simulator"] and second.split()[:3] == ["2", "r05", "simulator"]
    assert main(["status", "--db", str(db), "--json"]) == 0
    assert [(r["id"], r["name"]) for r in json.loads(capsys.readouterr().out)["runs"]] == [(1, "r02"), (2, "r05")]
