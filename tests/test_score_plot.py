"""The hallucination plot's labels."""

from __future__ import annotations

from pipeline.plots import plot_scores, run_label


def _score(run_id, pairs, rate):
    part = {"object_rate": rate, "attribute_rate": rate}
    return {"run_id": run_id, "name": f"r{run_id}", "model": "m", "method": "staged", "pairs_scored": pairs,
            "stage1": part, "stage2": part, "captions": {"missed_rate": rate, "invented_rate": rate}}


def test_the_legend_says_how_many_pairs_each_run_rests_on(tmp_path):
    assert run_label(_score(2, 30, 0.1)) == "run 2 r2: m (staged), 30 pairs"
    assert run_label(_score(3, 1, 0.1)).endswith(", 1 pair")
    path = plot_scores([_score(2, 30, 0.1), _score(3, 3, 0.5)], tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
