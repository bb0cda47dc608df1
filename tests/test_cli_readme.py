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
