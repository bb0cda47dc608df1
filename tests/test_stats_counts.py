"""Stats tab numbers against counts made by hand on a two-pair store."""

from __future__ import annotations

import pytest

from store.db import open_db
from ui import review_logic as rl
from ui import stats_logic as sl
from ui_store_builder import build_review_store


@pytest.fixture
def store(tmp_path):
    info = build_review_store(tmp_path, 2)
    info["db"] = open_db(info["db_path"])
    return info


def test_diversity_ignores_case_and_punctuation(store):
    # Pair 0: "Make the box yellow instead of red.", "Change the square into a circle.",
    # "Remove the tall brass lamp.", "Add a potted plant."; pair 1 the same with
    # "purple instead of blue". A reviewer drops the final stop of one caption: the text
    # is the same caption, not a new one, and "lamp" the same word.
    db, (first, _) = store["db"], store["annotation_ids"]
    rl.save_caption(db, f"{first}:c2", "remove the tall brass lamp", "ann", 0)
    [stats] = sl.caption_stats(db).values()
    assert stats["captions"] == 8
    assert sorted(stats["lengths"]) == [4, 4, 5, 5, 6, 6, 7, 7]
    assert stats["mean_words"] == pytest.approx(44 / 8)
    # 21 distinct words of 44: make the box yellow instead of red change square into a
    # circle remove tall brass lamp add potted plant purple blue
    assert stats["distinct_1"] == pytest.approx(21 / 44)
    # 36 bigrams; pair 1 adds only "box purple", "purple instead", "of blue" to pair 0's 18
    assert stats["distinct_2"] == pytest.approx(21 / 36)
    # 5 distinct captions of 8: both box captions, and the three shared ones
    assert stats["unique_share"] == pytest.approx(5 / 8)
    assert sl.caption_words("Don't move the TV, please!") == ["don't", "move", "the", "tv", "please"]


def test_flag_catch_counts_by_hand(tmp_path):
    # Demo-world pairs annotated by the simulator at error rate 0.3; for the first pair
    # flag every caption the ground truth says is invented plus one correct caption.
    from pipeline.scoring import score_annotation
    from ui_store_builder import build_demo_store

    info = build_demo_store(tmp_path, pairs=6, annotate=3)
    db = info["db"]
    ann = next(a for a in info["annotation_ids"] if score_annotation(db, a).captions.invented
               and len(score_annotation(db, a).captions.invented) < len(score_annotation(db, a).caption_ids))
    score = score_annotation(db, ann)
    invented = [score.caption_ids[i] for i in score.captions.invented]
    correct = next(c for c in score.caption_ids if c not in invented)
    for caption_id in [*invented, correct]:
        rl.set_flag(db, ann, "caption", caption_id, True, "ann")
    cache = sl.GroundTruthCache()
    assert sl.flag_catch_rows(db, cache) == []  # nothing decided yet: nothing was missed
    rl.set_status(db, ann, "rejected", "ann")
    rows = {row[1]: row for row in sl.flag_catch_rows(db, cache)}
    truly = len(score.hallucinated_caption_ids())   # invented individual captions + compounds holding one
    assert rows["captions"][2:5] == [truly, len(invented) + 1, len(invented)]
    assert rows["captions"][5] == f"{100 * len(invented) / truly:.0f}%"
    assert rows["captions"][6] == f"{100 * len(invented) / (len(invented) + 1):.0f}%"
    # a flag the pipeline set (a stage 2 object still renamed after its repair) is no
    # reviewer's call: it is neither caught nor a false flag
    from pipeline.scoring import score_flags
    with db.conn:
        db.execute("INSERT INTO flags (annotation_id, target_kind, target_id, reason, reviewer, created_at)"
                   " VALUES (?, 'descriptor', ?, 'renamed a reference object', 'pipeline', '2026-01-01')",
                   [ann, f"{score.stage2_id}/0/0"])
    assert score_flags(db, ann)["descriptors"]["flagged"] == 0


def test_the_pipelines_own_flags_are_not_counted_as_reviewers_flags(store):
    # A caption still over 77 CLIP tokens after its repair is stored flagged by the
    # pipeline (store.annotations.complete_annotation); that is no reviewer's judgment of
    # a hallucination, so the human-flag rates leave it out.
    db, (first, _) = store["db"], store["annotation_ids"]
    with db.conn:
        db.execute("INSERT INTO flags (annotation_id, target_kind, target_id, reason, reviewer, created_at)"
                   " VALUES (?, 'caption', ?, 'over 77 CLIP tokens', 'pipeline', '2026-01-01T00:00:00')",
                   [first, f"{first}:c0"])
    rl.set_status(db, first, "approved", "ann")
    [row] = sl.human_flag_counts(db)
    assert row["stage 3 captions"] == {"items": 4, "flagged": 0}
    rl.set_flag(db, first, "caption", f"{first}:c1", True, "ann")
    [row] = sl.human_flag_counts(db)
    assert row["stage 3 captions"] == {"items": 4, "flagged": 1}


def _reads(db):
    """The statements a block runs that read a pair's content (its captions, descriptor
    lists, images' scenes or edit list), as the scoring of one pair does."""
    seen = []

    def trace(sql):
        if any(f" FROM {table}" in sql for table in ("captions", "descriptions", "images", "pairs")):
            seen.append(sql)

    db.conn.set_trace_callback(trace)
    return seen


def _flags_from_scratch(db):
    """The flag table's counts, each decided pair scored on its own by score_flags."""
    from pipeline.scoring import score_flags

    totals = {part: [0, 0, 0] for part in ("descriptors", "captions")}
    for (ann,) in db.execute("SELECT id FROM annotations WHERE status = 'done'"
                             " AND review_status IN ('approved', 'rejected')").fetchall():
        result = score_flags(db, ann)
        for part, total in totals.items():
            for i, key in enumerate(("hallucinated", "flagged", "caught")):
                total[i] += result[part][key]
    return totals


def test_a_review_change_rescores_no_pair_and_counts_as_from_scratch(tmp_path):
    # A reviewer approves, flags and edits one pair and reopens Stats: the ground-truth
    # scores of the run's pairs are kept (a done pair's answers never change), only the
    # changed pair's flags are matched again, and the numbers are those of a fresh count.
    from pipeline.scoring import score_run
    from ui_store_builder import build_demo_store

    info = build_demo_store(tmp_path, pairs=12, annotate=12)
    db, ids = info["db"], info["annotation_ids"]
    for ann in ids[:6]:
        rl.set_status(db, ann, "approved", "ann")
    rl.set_flag(db, ids[0], "caption", f"{ids[0]}:c0", True, "ann")
    cache = sl.GroundTruthCache()
    sl.ground_truth_rates(db, cache)
    sl.flag_catch_rows(db, cache)

    changes = [
        lambda: rl.set_status(db, ids[7], "rejected", "ann"),
        lambda: rl.set_flag(db, ids[7], "caption", f"{ids[7]}:c1", True, "ann"),
        lambda: rl.save_caption(db, f"{ids[1]}:c0", "add a red lamp", "ann", 0),
        lambda: rl.set_flag(db, ids[0], "caption", f"{ids[0]}:c0", False, "ann"),
    ]
    for i, change in enumerate(changes, 1):
        change()
        reads = _reads(db)
        rates, rows = sl.ground_truth_rates(db, cache), sl.flag_catch_rows(db, cache)
        db.conn.set_trace_callback(None)
        assert reads == []                           # no pair scored again
        assert cache.pairs_scored == len(ids)
        assert cache.pairs_matched <= 6 + i          # the 6 decided pairs once, then the changed one
        fresh = sl.GroundTruthCache()
        assert rates == sl.ground_truth_rates(db, fresh)
        assert rows == sl.flag_catch_rows(db, fresh)
        assert cache.score(db, 1) == score_run(db, 1)
        if rows:
            by_hand = _flags_from_scratch(db)
            assert {row[1]: row[2:5] for row in rows} == by_hand


def test_scoring_a_run_reads_the_store_in_chunks_not_per_pair(tmp_path):
    from pipeline.scoring import score_flags, score_run
    from ui_store_builder import build_demo_store

    info = build_demo_store(tmp_path, pairs=16, annotate=16)
    db = info["db"]
    reads = _reads(db)
    result = score_run(db, 1)
    db.conn.set_trace_callback(None)
    assert result["pairs"] == 16
    assert len(reads) < 16 / 2   # was 4 statements per pair
    reads = _reads(db)
    score_flags(db, run_id=1)
    db.conn.set_trace_callback(None)
    assert len(reads) < 16 / 2


def test_the_stats_tab_says_how_far_scoring_is(tmp_path):
    from ui_store_builder import build_demo_store

    info = build_demo_store(tmp_path, pairs=6, annotate=6)
    seen = []
    sl.ground_truth_rates(info["db"], sl.GroundTruthCache(), lambda done, total, what: seen.append((done, total)))
    assert seen and seen[-1] == (6, 6)
