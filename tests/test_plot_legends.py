"""Legends never sit on the data: score --plot, the Stats tab's plots and eval --plot drew
their legends inside the axes (upper left/right, lower right), over the tallest bars or the
lowest curves, so a reader could not read the numbers a decision rests on. Checked on the
drawn figure's artists (tests/plot_checks.py), with the numbers of a real demo store."""

from __future__ import annotations

from plot_checks import hidden_by_legends, overlapping_tick_labels
from ui import stats_logic as sl

LABELS = ["run 1 · r02 · simulator / simulator-v1 · started 2026-11-28 01:27:21 UTC",
          "run 2 · r05 · simulator / simulator-v1 · started 2026-11-28 01:27:23 UTC",
          "run 3 · openai / gpt-4o · started 2026-11-28 01:28:17 UTC"]
# The Stats tab's ground-truth rates of a 60-pair demo store: simulator at error rates 0.2
# and 0.5, and a local server's answers.
RATES = [(0.049, 0.064, 0.059, 0.095, 0.667, 0.486), (0.066, 0.146, 0.113, 0.209, 0.871, 0.781),
         (0.421, 0.233, 0.342, 0.183, 1.0, 1.0)]
# A model that invents most objects: what the score plot is for.
BAD_RUN = (0.93, 0.61, 0.88, 0.57, 0.95, 0.9)


def _score(run_id, rates):
    s1o, s1a, s2o, s2a, inv, miss = rates
    return {"run_id": run_id, "name": f"r{run_id}", "model": "simulator-v1", "method": "staged",
            "pairs_scored": 60, "stage1": {"object_rate": s1o, "attribute_rate": s1a},
            "stage2": {"object_rate": s2o, "attribute_rate": s2a},
            "captions": {"invented_rate": inv, "missed_rate": miss}}


def test_score_plot_legend_hides_no_bar(tmp_path):
    from pipeline.plots import draw_scores, plot_scores

    scores = [_score(i + 1, r) for i, r in enumerate(RATES + [BAD_RUN])]
    fig = draw_scores(scores)
    assert hidden_by_legends(fig) == []
    assert overlapping_tick_labels(fig) == []
    # the bars drawn are the rates, in percent
    heights = sorted(round(p.get_height(), 1) for p in fig.axes[0].patches)
    assert heights == sorted(round(100 * v, 1) for r in RATES + [BAD_RUN] for v in r)
    assert plot_scores(scores, tmp_path / "runs.png").read_bytes()[:4] == b"\x89PNG"


def test_stats_ground_truth_plot_legend_hides_no_bar():
    names = [label for _, _, label in sl.GT_MEASURES]
    fig = sl.plot_ground_truth({label: dict(zip(names, r)) for label, r in zip(LABELS, RATES)})
    assert hidden_by_legends(fig) == []
    assert overlapping_tick_labels(fig) == []
    heights = [round(p.get_height(), 1) for p in fig.axes[0].patches]
    assert heights == [round(100 * v, 1) for r in RATES for v in r]


# The browser test's Stats tab: five runs, labelled with the settings they differ in.
LONG_LABELS = [
    "run 1 · simulator / simulator-v1 · error_rate 0.3 · limit 10 · seed 1 · started 2026-11-28 01:42:36 UTC",
    "run 2 · started later · simulator / sim-later · created 2026-11-28 01:43:18 UTC",
    "run 3 · simulator / simulator-v1 · error_rate 0.1 · limit 3 · seed 0 · started 2026-11-28 01:44:21 UTC",
    "run 4 · openai / live-progress-model · started 2026-11-28 01:44:28 UTC",
    "run 5 · <img src=x onerror=\"window.g4cPwned=3\"> · simulator / sim-x · created 2026-11-28 01:44:30 UTC",
]


def _human_rows():
    rows = []
    for i, label in enumerate(LONG_LABELS):
        row = {"run_id": i + 1, "label": label, "model": "simulator-v1", "prompt_version": "stage1:e1eda0",
               "pairs": 20}
        for stage, flagged in zip(sl.STAGES, (7, 7, 3, 8 - i)):
            row[stage] = {"items": 100, "flagged": flagged}
        rows.append(row)
    return rows


def test_stats_review_plots_legends_hide_no_data():
    progress = {label: {"approved": 15, "rejected": 5, "unreviewed": 40, "flagged": 16, "annotating": 0,
                        "failed": 0} for label in LABELS}
    lengths = [4, 5, 5, 6, 7, 8, 8, 8, 8, 9, 9, 10, 12, 15]
    captions = {label: {"captions": len(lengths), "lengths": lengths, "mean_words": 8.0, "distinct_1": 0.05,
                        "distinct_2": 0.29, "unique_share": 0.98} for label in LABELS}
    for fig in (sl.plot_human_rates(_human_rows()), sl.plot_review_progress(progress),
                sl.plot_caption_stats(captions)):
        assert hidden_by_legends(fig) == [], fig.axes[0].get_title()
        assert overlapping_tick_labels(fig) == [], fig.axes[0].get_title()
        for ax in fig.axes:  # no title or legend cut off at the figure's edge ('lagged as hallucination ...')
            for artist in (ax.title, ax.get_legend()):
                if artist is not None:
                    box = artist.get_window_extent()
                    assert box.x0 >= 0 and box.x1 <= fig.bbox.x1, ax.get_title()


def test_caption_length_histogram_has_whole_word_ticks():
    lengths = [4, 5, 5, 6, 7, 8, 8, 9, 12, 17]
    fig = sl.plot_caption_stats({LABELS[0]: {"captions": 10, "lengths": lengths, "mean_words": 8.1,
                                             "distinct_1": 0.1, "distinct_2": 0.3, "unique_share": 1.0}})
    fig.draw_without_rendering()
    ax = fig.axes[0]
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    # each bar is one length in words, centred on it
    counts = {round(p.get_x() + p.get_width() / 2): p.get_height() for p in ax.patches if p.get_height()}
    assert counts == {4: 1, 5: 2, 6: 1, 7: 1, 8: 2, 9: 1, 12: 1, 17: 1}


def test_recall_plot_legends_hide_no_curve():
    from retrieval.recall_plot import draw_recall_plot

    ks = range(1, 51)
    curves = {
        "recall": {"model": [min(97.5, 61.3 + 30 * (k - 1) ** 0.3) for k in ks],
                   "fusion model alone": [min(97.0, 25.2 + 15 * k ** 0.5) for k in ks],
                   "image baseline": [min(97.0, 19.9 + 15 * k ** 0.5) for k in ks],
                   "text baseline": [0.14 * k for k in ks],
                   "sum baseline": [min(97.0, 22.6 + 15 * k ** 0.5) for k in ks]},
        "subsets": {"heldout_combo (340 queries)": [min(97.0, 57.9 + 20 * k) for k in ks],
                    "seen (296 queries)": [min(97.0, 72.3 + 20 * k) for k in ks]},
        "recall_subset": {"model": [65.3, 92.0, 99.0, 100.0, 100.0],
                          "text baseline": [11.1, 38.2, 71.8, 93.9, 100.0]},
    }
    fig = draw_recall_plot(curves, title="tiny, split test: 786 queries, gallery of 1102")
    assert hidden_by_legends(fig) == []
    assert overlapping_tick_labels(fig) == []
    model = [line for ax in fig.axes for line in ax.get_lines() if line.get_label().startswith("model (@1 61.3)")]
    assert list(model[0].get_ydata()) == curves["recall"]["model"]


def _val(r1, r5, r50, rs1):
    return {"queries": 400, "recall": {"1": r1, "5": r5, "10": r5, "50": r50}, "recall_subset": {"1": rs1}}


def test_training_curves_legends_hide_no_curve():
    """curves.png of a `make demo` run (its history.json's numbers): the validation legend
    covered R@1 and R_subset@1, the re-ranker's covered both fusion-alone lines and its loss."""
    from retrieval.train import draw_history

    fusion = [(17.0, 56.0, 87.0, 28.0), (18.5, 57.5, 91.0, 34.5), (20.5, 60.75, 93.5, 34.0),
              (23.0, 63.75, 96.75, 35.25), (21.0, 66.0, 96.5, 33.25), (20.25, 65.75, 96.75, 32.5)]
    reranked = [(21.0 + 2.3 * i, 77.0, 96.75, 34.5 + 1.9 * i) for i in range(18)]
    history = {
        "loss": [[step, 7.5 - step / 80] for step in range(1, 267)],
        "epochs": [{"epoch": i + 1, "loss": 6.2 - i / 3, "val": _val(*v)} for i, v in enumerate(fusion)],
        "config": {"training": {"rerank_top_k": 100}},
        "summary": {"best": {"first_stage": {"epoch": 4}}},
        "rerank": {"enabled": True, "first_stage_val": _val(*fusion[3]),
                   "epochs": [{"epoch": i + 1, "loss": 4.7 - i / 5, "val": _val(*v)} for i, v in enumerate(reranked)],
                   "best": {"epoch": 18, "averaged_epochs": [14, 15, 16, 17, 18], "val": _val(59.75, 96.0, 96.75, 64.5)}},
    }
    fig = draw_history(history)
    assert hidden_by_legends(fig) == []
    assert overlapping_tick_labels(fig) == []
    labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert "re-ranker loss" in labels and "best.pt: epoch 4" in labels, labels
    r1 = next(line for line in fig.axes[1].get_lines() if line.get_label() == "R@1")
    assert list(r1.get_ydata()) == [v[0] for v in fusion]


def test_stats_flag_plot_names_a_run_with_no_decided_pairs():
    # A run nobody reviewed yet had zero-height (invisible) bars: only its legend entry
    # showed it was there, as if reviewers had flagged nothing of it.
    rows = _human_rows()[:2]
    rows[1] = {**rows[1], "pairs": 0, **{stage: {"items": 0, "flagged": 0} for stage in sl.STAGES},
               "model": "other-model"}
    fig = sl.plot_human_rates(rows)
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes if ax.get_legend()]
    assert legends[0] == [LONG_LABELS[0], f"{LONG_LABELS[1]} (no decided pairs)"], legends
    assert legends[1] == ["simulator-v1", "other-model (no decided pairs)"], legends
    assert hidden_by_legends(fig) == []


def test_recall_plot_says_when_its_subsets_overlap():
    # recall.png's subsets ('heldout_combo (3 queries)', 'heldout_phrasing (2 queries)',
    # 'seen (2 queries)') added up to more than the 5 queries of its title, with no word why:
    # a query held out in two ways is in both subsets.
    import numpy as np

    from retrieval.evaluate import Queries, recall_curves
    from retrieval.recall_plot import draw_recall_plot

    gallery = [f"g{i}" for i in range(8)]
    tags = [{"heldout_combo", "heldout_phrasing"}, {"heldout_combo"}, {"heldout_combo", "heldout_phrasing"}, set(),
            set()]
    queries = Queries(pair_ids=[f"p{i}" for i in range(5)], reference_keys=gallery[:5],
                      target_keys=gallery[3:8], texts=["t"] * 5, img_sets=[None] * 5,
                      ground_truths=[[g] for g in gallery[3:8]], tags=tags)
    scores = np.random.default_rng(0).normal(size=(5, 8))
    curves = recall_curves({"gallery": np.zeros((8, 4))}, scores, None, gallery, queries)
    assert sorted(curves["subsets"]) == ["heldout_combo (3 queries)", "heldout_phrasing (2 queries)",
                                         "seen (2 queries)"]
    fig = draw_recall_plot(curves, title="5 queries")
    titles = [ax.get_title() for ax in fig.axes]
    assert any("2 queries are in more than one subset" in t for t in titles), titles
    assert hidden_by_legends(fig) == []
