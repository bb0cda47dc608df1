"""retrieval.metrics against hand-computed cases and a brute-force reference on seeded data."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.metrics import (
    bootstrap_interval,
    map_at_k,
    median_rank,
    recall_at_k,
    recall_subset_at_k,
    subset_ranks,
    target_ranks,
    top_k_indices,
)

GALLERY = ["a", "b", "c", "d", "e"]


# ------------------------------------------------------------------ hand-computed cases


def test_reference_is_removed_from_the_ranking():
    # Query 0: reference "a" scores highest, target "b" second -> rank 1 once "a" is out.
    scores = np.array([[0.9, 0.8, 0.1, 0.0, -0.5]])
    assert recall_at_k(scores, GALLERY, ["a"], ["b"], [1]) == {1: 100.0}
    # Without removing the reference the target is second.
    assert recall_at_k(scores, GALLERY, None, ["b"], [1, 2]) == {1: 0.0, 2: 100.0}
    # A reference outside the gallery removes nothing.
    assert recall_at_k(scores, GALLERY, ["zzz"], ["b"], [1, 2]) == {1: 0.0, 2: 100.0}


def test_recall_averages_over_queries_in_percent():
    scores = np.array(
        [
            [0.0, 0.9, 0.5, 0.1, 0.2],  # ref a, target b: rank 1
            [0.1, 0.0, 0.9, 0.3, 0.2],  # ref b, target d: c ahead -> rank 2
            [0.9, 0.8, 0.0, 0.7, 0.1],  # ref c, target e: a, b, d ahead -> rank 4
            [0.5, 0.4, 0.3, 0.0, 0.2],  # ref d, target e: a, b, c ahead -> rank 4
        ]
    )
    refs, targets = ["a", "b", "c", "d"], ["b", "d", "e", "e"]
    assert target_ranks(scores, GALLERY, refs, targets).tolist() == [1, 2, 4, 4]
    assert recall_at_k(scores, GALLERY, refs, targets, [1, 2, 3, 4]) == {1: 25.0, 2: 50.0, 3: 50.0, 4: 100.0}
    assert median_rank(scores, GALLERY, refs, targets) == 3.0


def test_ties_rank_the_target_after_every_tied_item():
    # The target "c" ties with "b" and "d"; the reference "a" ties too but is removed.
    scores = np.array([[0.5, 0.5, 0.5, 0.5, 0.1]])
    assert target_ranks(scores, GALLERY, ["a"], ["c"]).tolist() == [3]
    # A constant score matrix is the worst case: last of the gallery minus the reference.
    constant = np.zeros((2, 5))
    assert target_ranks(constant, GALLERY, ["a", "b"], ["b", "a"]).tolist() == [4, 4]
    assert recall_at_k(constant, GALLERY, ["a", "b"], ["b", "a"], [1, 3, 4]) == {1: 0.0, 3: 0.0, 4: 100.0}


def test_gallery_order_does_not_change_metrics():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 3, size=(20, 8)).astype(np.float32)  # many ties
    gallery = [f"g{i}" for i in range(8)]
    refs = [gallery[i % 8] for i in range(20)]
    targets = [gallery[(i + 3) % 8] for i in range(20)]
    perm = rng.permutation(8)
    before = recall_at_k(scores, gallery, refs, targets, [1, 3])
    after = recall_at_k(scores[:, perm], [gallery[i] for i in perm], refs, targets, [1, 3])
    assert before == after
    truths = [[targets[i], gallery[(i + 5) % 8]] for i in range(20)]
    assert map_at_k(scores, gallery, refs, truths, [2, 5]) == map_at_k(
        scores[:, perm], [gallery[i] for i in perm], refs, truths, [2, 5]
    )


def test_recall_subset_ranks_within_the_image_set_without_the_reference():
    # Gallery-wide the target "e" is last, but within its set {a(ref), c, e} only c is a rival.
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.65]])
    members = [["a", "c", "e"]]
    assert recall_subset_at_k(scores, GALLERY, ["a"], ["e"], members, [1, 2]) == {1: 0.0, 2: 100.0}
    # Raise e above c: rank 1 in the subset even though b, the reference and d score higher.
    scores[0, 4] = 0.75
    assert recall_subset_at_k(scores, GALLERY, ["a"], ["e"], members, [1]) == {1: 100.0}
    # The reference itself scoring highest never counts.
    assert recall_subset_at_k(scores, GALLERY, ["a"], ["e"], [["e", "a"]], [1]) == {1: 100.0}
    # Ties inside the set are pessimistic too.
    scores[0, 2] = 0.75
    assert recall_subset_at_k(scores, GALLERY, ["a"], ["e"], members, [1, 2]) == {1: 0.0, 2: 100.0}


def test_bootstrap_interval_by_hand():
    # Every query right (or wrong): nothing to vary.
    assert bootstrap_interval([1, 1, 1], ["p", "q", "r"]) == (100.0, 100.0)
    assert bootstrap_interval([0, 0], ["p", "q"]) == (0.0, 0.0)
    # Two groups, one all right, one all wrong: a resample holds 0, 1 or 2 of the right
    # one, so the mean is 0, 50 or 100 with odds 1/4, 1/2, 1/4.
    low, high = bootstrap_interval([1, 1, 0, 0], ["p", "p", "q", "q"], level=0.9)
    assert (low, high) == (0.0, 100.0)
    low, high = bootstrap_interval([1, 1, 0, 0], ["p", "p", "q", "q"], level=0.4)
    assert low == high == 50.0
    # Groups of unequal size weigh by their queries: the point estimate is inside.
    hits, groups = [1, 1, 1, 0], ["p", "p", "p", "q"]
    low, high = bootstrap_interval(hits, groups, level=0.5)
    assert low <= 75.0 <= high


def test_bootstrap_interval_resamples_whole_groups_and_is_seeded():
    rng = np.random.default_rng(0)
    pair_hits = rng.random(100) < 0.6
    hits = np.repeat(pair_hits, 4)  # four captions per pair, right or wrong together
    by_pair = bootstrap_interval(hits, np.repeat(np.arange(100), 4))
    by_query = bootstrap_interval(hits, np.arange(400))
    assert by_pair == bootstrap_interval(hits, np.repeat(np.arange(100), 4))  # same seed, same answer
    assert by_pair != bootstrap_interval(hits, np.repeat(np.arange(100), 4), seed=1)
    # The correlated captions make the honest interval about twice as wide (sqrt(4)).
    width_pair, width_query = by_pair[1] - by_pair[0], by_query[1] - by_query[0]
    assert 1.6 < width_pair / width_query < 2.5, (by_pair, by_query)
    # About 19 points wide for 100 pairs at 60%: 2 x 1.96 x sqrt(0.6 x 0.4 / 100) x 100.
    assert 15 < width_pair < 23
    assert by_pair[0] < 100 * pair_hits.mean() < by_pair[1]
    with pytest.raises(ValueError, match="equal-length"):
        bootstrap_interval([1, 0], ["p"])
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval([1, 0], ["p", "q"], level=95)


def test_map_several_ground_truths_by_hand():
    # Ranking (reference "a" removed): b, c, d, e.  Ground truths: b and d.
    scores = np.array([[1.0, 0.9, 0.8, 0.7, 0.6]])
    result = map_at_k(scores, GALLERY, ["a"], [["d", "b"]], [1, 2, 3, 4])
    # AP@1 = (1/1)/min(1,2) = 1; AP@2 = 1/2; AP@3 = (1 + 2/3)/2; AP@4 same.
    assert result[1] == pytest.approx(100.0)
    assert result[2] == pytest.approx(50.0)
    assert result[3] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert result[4] == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_map_divides_by_min_k_and_number_of_ground_truths():
    # Three ground truths at ranks 2, 3, 5 (no reference removal, CIRCO style).
    gallery = [f"g{i}" for i in range(6)]
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    truths = [["g1", "g2", "g4"]]
    result = map_at_k(scores, gallery, None, truths, [1, 2, 5, 6])
    assert result[1] == 0.0
    assert result[2] == pytest.approx(100 * (1 / 2) / 2)
    assert result[5] == pytest.approx(100 * (1 / 2 + 2 / 3 + 3 / 5) / 3)
    assert result[6] == pytest.approx(result[5])


def test_map_counts_ground_truths_missing_from_the_gallery_as_circo_does():
    """A ground truth the dataset names whose image is not in the gallery (missing or
    unreadable) was dropped from n_gt, so AP was divided by fewer and came out above the
    official one (miccunifi/CIRCO evaluation.py divides by min(k, len(gt_img_ids)))."""
    gallery = [f"g{i}" for i in range(6)]
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    # Found ground truths at ranks 2 and 4; the dataset names two more, not in the gallery.
    result = map_at_k(scores, gallery, None, [["g1", "g3"]], [1, 2, 5], ground_truth_counts=[4])
    assert result[1] == 0.0
    assert result[2] == pytest.approx(100 * (1 / 2) / 2)  # min(2, 4) = 2
    assert result[5] == pytest.approx(100 * (1 / 2 + 2 / 4) / 4)  # min(5, 4) = 4, not 2
    official = _official_circo_ap(gallery, ["g1", "g3", "lost1", "lost2"], 5)
    assert result[5] == pytest.approx(100 * official)
    # Without counts: the found ones are all there is.
    assert map_at_k(scores, gallery, None, [["g1", "g3"]], [5])[5] == pytest.approx(100 * (1 / 2 + 2 / 4) / 2)
    with pytest.raises(ValueError, match="ground_truth_counts has 2 entries for 1 queries"):
        map_at_k(scores, gallery, None, [["g1"]], [5], ground_truth_counts=[1, 1])


def test_map_ties_put_ground_truths_after_tied_irrelevant_items():
    gallery = ["x", "y", "z"]
    scores = np.array([[0.5, 0.5, 0.5]])
    # One ground truth tied with two others: it is placed third.
    assert map_at_k(scores, gallery, None, [["x"]], [1, 3]) == {1: 0.0, 3: pytest.approx(100 / 3)}
    # Two ground truths tied with one irrelevant: positions 2 and 3.
    result = map_at_k(scores, gallery, None, [["x", "z"]], [3])
    assert result[3] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)


def test_bad_input_names_the_query_and_item():
    scores = np.zeros((1, 5))
    with pytest.raises(ValueError, match="query 0: target 'nope' is not in the gallery"):
        recall_at_k(scores, GALLERY, ["a"], ["nope"], [1])
    with pytest.raises(ValueError, match="is the reference image"):
        recall_at_k(scores, GALLERY, ["a"], ["a"], [1])
    with pytest.raises(ValueError, match="not in its image set"):
        recall_subset_at_k(scores, GALLERY, ["a"], ["b"], [["a", "c"]], [1])
    with pytest.raises(ValueError, match="appears twice"):
        recall_at_k(np.zeros((1, 2)), ["a", "a"], None, ["a"], [1])
    with pytest.raises(ValueError, match="gallery columns"):
        recall_at_k(np.zeros((1, 4)), GALLERY, None, ["a"], [1])
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(np.full((1, 5), np.nan), GALLERY, None, ["a"], [1])
    with pytest.raises(ValueError, match="ground truth 'q' is not in the gallery"):
        map_at_k(scores, GALLERY, None, [["a", "q"]], [1])


def test_top_k_indices_removes_reference_and_breaks_ties_by_gallery_order():
    scores = np.array([[0.5, 0.9, 0.5, 0.5, 0.1]])
    assert top_k_indices(scores, GALLERY, ["b"], 3).tolist() == [[0, 2, 3]]
    assert top_k_indices(scores, GALLERY, None, 10).tolist() == [[1, 0, 2, 3, 4]]


# -------------------------------------------------------- brute force on seeded data


def _pessimistic_ranking(row, gallery, reference, relevant):
    """Explicit sort: score descending, irrelevant before relevant on ties."""
    items = [(name, row[i]) for i, name in enumerate(gallery) if name != reference]
    items.sort(key=lambda item: (-item[1], item[0] in relevant))
    return [name for name, _ in items]


def _official_circo_ap(ranking, truths, k):
    """The CIRCO server's computation (miccunifi/CIRCO src/evaluation.py), on a ranked list."""
    labels = np.isin(np.array(ranking, dtype=object), list(truths))
    precisions = np.cumsum(labels) * labels / np.arange(1, len(labels) + 1)
    return float(np.sum(precisions[:k]) / min(len(truths), k))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("quantised", [False, True])
def test_against_brute_force(seed, quantised):
    rng = np.random.default_rng(seed)
    num_queries, num_gallery = 40, 30
    gallery = [f"img{i:03d}" for i in range(num_gallery)]
    scores = rng.normal(size=(num_queries, num_gallery)).astype(np.float32)
    if quantised:  # heavy ties
        scores = np.round(scores)
    refs, targets, truths, members = [], [], [], []
    for _ in range(num_queries):
        chosen = rng.choice(num_gallery, size=7, replace=False)
        refs.append(gallery[chosen[0]])
        targets.append(gallery[chosen[1]])
        truths.append([gallery[c] for c in chosen[1 : 1 + rng.integers(1, 5)]])
        members.append([gallery[c] for c in chosen[:6]])
    ks = [1, 2, 3, 5, 10, 50]

    expected_ranks, expected_subset, expected_ap = [], [], {k: [] for k in ks}
    for q in range(num_queries):
        ranking = _pessimistic_ranking(scores[q], gallery, refs[q], {targets[q]})
        expected_ranks.append(ranking.index(targets[q]) + 1)
        subset = [n for n in ranking if n in members[q]]
        expected_subset.append(subset.index(targets[q]) + 1)
        truth_ranking = _pessimistic_ranking(scores[q], gallery, refs[q], set(truths[q]))
        for k in ks:
            expected_ap[k].append(_official_circo_ap(truth_ranking, truths[q], k))
    expected_ranks = np.array(expected_ranks)
    expected_subset = np.array(expected_subset)

    assert target_ranks(scores, gallery, refs, targets).tolist() == expected_ranks.tolist()
    recall = recall_at_k(scores, gallery, refs, targets, ks)
    assert recall == {k: pytest.approx(100 * np.mean(expected_ranks <= k)) for k in ks}
    assert subset_ranks(scores, gallery, refs, targets, members).tolist() == expected_subset.tolist()
    subset = recall_subset_at_k(scores, gallery, refs, targets, members, [1, 2, 3])
    assert subset == {k: pytest.approx(100 * np.mean(expected_subset <= k)) for k in [1, 2, 3]}
    assert median_rank(scores, gallery, refs, targets) == float(np.median(expected_ranks))
    mean_ap = map_at_k(scores, gallery, refs, truths, ks)
    assert mean_ap == {k: pytest.approx(100 * np.mean(expected_ap[k])) for k in ks}


def test_chunked_ranks_match_brute_force_beyond_one_chunk():
    rng = np.random.default_rng(7)
    gallery = [str(i) for i in range(50)]
    scores = np.round(rng.normal(size=(1100, 50)), 1)
    refs = [str(i % 50) for i in range(1100)]
    targets = [str((i * 7 + 1) % 50) for i in range(1100)]
    ranks = target_ranks(scores, gallery, refs, targets)
    for q in range(0, 1100, 97):
        ranking = _pessimistic_ranking(scores[q], gallery, refs[q], {targets[q]})
        assert ranks[q] == ranking.index(targets[q]) + 1


# ------------------------------------------------------------------ submission files


def test_cirr_submissions_follow_the_server_template(tmp_path):
    import json

    from retrieval.submission import write_cirr_submissions

    rng = np.random.default_rng(0)
    gallery = [f"test1-{i}-0-img{i % 2}" for i in range(60)]
    scores = rng.normal(size=(3, 60))
    refs = [gallery[0], gallery[1], gallery[2]]
    scores[0, 0] = 10.0  # the reference scores highest: must not be submitted
    members = [gallery[0:6], gallery[1:7], gallery[2:8]]
    recall_path, subset_path = write_cirr_submissions(
        tmp_path, "demo", scores, gallery, refs, [12063, 5, 7], members
    )
    recall = json.loads(recall_path.read_text())
    subset = json.loads(subset_path.read_text())
    assert recall["version"] == "rc2" and recall["metric"] == "recall"
    assert subset["version"] == "rc2" and subset["metric"] == "recall_subset"
    assert set(recall) == {"version", "metric", "12063", "5", "7"}
    assert all(len(recall[k]) == 50 for k in ("12063", "5", "7"))
    assert gallery[0] not in recall["12063"]
    # Top-50 equals the brute-force order of the gallery minus the reference.
    expected = [gallery[i] for i in np.argsort(-scores[0]) if i != 0][:50]
    assert recall["12063"] == expected
    # Subset: top 3 of the 5 members other than the reference, by score.
    for key, q in (("12063", 0), ("5", 1), ("7", 2)):
        others = [m for m in members[q] if m != refs[q]]
        ranked = sorted(others, key=lambda n: -scores[q, gallery.index(n)])
        assert subset[key] == ranked[:3]


def test_circo_submission_and_query_text():
    from retrieval.submission import circo_image_id, circo_query_text, circo_submission

    assert circo_query_text("a teddy bear", "is held by a little girl") == "a teddy bear is held by a little girl"
    assert circo_query_text(None, " has two dogs ") == "has two dogs"
    assert circo_image_id("000000243611.jpg") == 243611
    with pytest.raises(ValueError, match="numeric COCO image ids"):
        circo_image_id("images/cat.png")
    gallery = [f"{i:012d}.jpg" for i in range(1, 81)]
    scores = np.random.default_rng(1).normal(size=(2, 80))
    submission = circo_submission(scores, gallery, [0, 1])
    assert list(submission) == ["0", "1"]
    assert submission["0"] == [int(i) + 1 for i in np.argsort(-scores[0])[:50]]
    assert all(isinstance(x, int) for x in submission["1"])
    with pytest.raises(ValueError, match="appears twice"):
        circo_submission(scores, gallery, [3, 3])


def test_pixel_baseline_ranks_by_squared_distance_to_the_reference():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "pixel_baseline.py"
    spec = importlib.util.spec_from_file_location("pixel_baseline", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(0)
    gallery = rng.random((6, 12)).astype(np.float32)
    queries = gallery[[0, 3]] + 0.01
    scores = bench.pixel_scores(queries, gallery)
    brute = -((queries[:, None, :] - gallery[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(scores, brute, rtol=1e-4, atol=1e-4)
    assert scores.argmax(1).tolist() == [0, 3]
    # Through the CIRR metrics with the reference removed: the next-closest image wins.
    names = [f"g{i}" for i in range(6)]
    second = [int(np.argsort(-s)[1]) for s in scores]
    result = recall_at_k(scores, names, ["g0", "g3"], [names[i] for i in second], [1])
    assert result[1] == pytest.approx(100.0)


def test_bootstrap_resamples_pairs_of_images_across_a_mix(tmp_path):
    # The intervals resample whole pairs, by pair id. In a mix, ids say nothing: two demo
    # worlds name different pairs alike, while CIRR and CIRRR (one dataset imported twice,
    # its own captions and generated ones) hold each pair twice, under ids that may differ.
    # A pair is its reference and target image.
    import shutil

    from test_retrieval_world import make_world_store

    from retrieval.data import load_triplets
    from retrieval.evaluate import bootstrap_groups, build_queries

    store = make_world_store(tmp_path / "one", pairs=8, seed=1)
    shutil.copy(store, tmp_path / "copy.db")
    twice = build_queries(load_triplets([store, tmp_path / "copy.db"]).triplets)
    groups = bootstrap_groups(twice)
    assert len(groups) == len(twice.texts)
    assert len(set(groups)) == len(set(zip(twice.reference_keys, twice.target_keys))) <= 8
    other = make_world_store(tmp_path / "two", pairs=8, seed=2)
    mixed = build_queries(load_triplets([store, other]).triplets)
    pairs = list(zip(mixed.reference_keys, mixed.target_keys))
    groups = bootstrap_groups(mixed)
    for i in range(len(groups)):
        for j in range(len(groups)):
            assert (groups[i] == groups[j]) == (pairs[i] == pairs[j])


def test_held_out_phrasing_is_a_mark_of_the_datasets_own_captions():
    # The demo world marks test pairs whose own captions use phrasings training never saw.
    # eval --source auto (or generated, both) also queried such a pair with its generated
    # captions, in the VLM's phrasing, and counted them in [heldout_phrasing] all the same.
    from retrieval.data import Triplet
    from retrieval.evaluate import caption_tags

    pair = Triplet("p", "r", "t", ["own", "generated", "compound"], ["original", "individual", "compound"],
                   split="test", extra={"heldout": ["phrasing", "combo"]})
    assert [caption_tags(pair, i) for i in range(3)] == [
        {"heldout_phrasing", "heldout_combo"}, {"heldout_combo"}, {"heldout_combo"}]
    marked = Triplet("q", "r", "t", ["own", "generated"], ["original", "individual"],
                     extra={"heldout": {"phrasing_captions": [0, 1], "combo": False}})
    assert [caption_tags(marked, i) for i in range(2)] == [{"heldout_phrasing"}, set()]
