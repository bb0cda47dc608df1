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
