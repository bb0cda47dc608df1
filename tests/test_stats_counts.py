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


def test_flag_scores_follow_which_pairs_are_decided_not_only_how_many(store):
    db, (first, second) = store["db"], store["annotation_ids"]
    cache, calls = sl.GroundTruthCache(), []

    def compute():
        calls.append(1)
        return {"n": len(calls)}

    rl.set_status(db, first, "approved", "ann")
    assert cache._cached(db, "flags", 1, compute) == {"n": 1}
    rl.save_note(db, first, "a note", "ann")
    assert cache._cached(db, "flags", 1, compute) == {"n": 1}   # a note changes no score
    rl.set_status(db, first, "unreviewed", "ann")
    rl.set_status(db, second, "approved", "ann")                # still one decided pair
    assert cache._cached(db, "flags", 1, compute) == {"n": 2}


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
