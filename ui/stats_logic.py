"""The Stats tab: hallucination rates from human flags and from ground truth, review
progress, caption length and diversity, as numbers (plain dicts) and matplotlib plots.

Human-flag rates count only decided pairs (approved or rejected): the share of their
descriptors / captions that a reviewer flagged (the pipeline's own flags, on what it
could not get repaired, are no reviewer's judgment and are left out). Ground-truth rates come from
pipeline.scoring.score_run (demo-world pairs only).
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
from collections import defaultdict
from typing import Any, Callable, Optional

import sqlite_utils

from store.models import PIPELINE_REVIEWER

from .review_logic import run_labels

log = logging.getLogger("good4cir.ui")

STAGES = ("stage 1 descriptors", "stage 2 descriptors", "stage 3 captions", "stage 4 compounds")
_DECIDED = "a.status = 'done' AND a.review_status IN ('approved', 'rejected')"
MAX_CAPTIONS_FOR_DIVERSITY = 50_000


def _runs(db) -> dict[int, dict]:
    # Labelled as the Review tab's Run filter labels runs (without its annotated-pairs
    # count, which would change the label under a running pipeline between two tables).
    labels = run_labels(db, progress=False)
    runs = {}
    for run_id, name, backend, model, method, prompt_versions in db.execute(
            "SELECT id, name, backend, model, method, prompt_versions FROM runs ORDER BY id").fetchall():
        versions = json.loads(prompt_versions or "{}")
        # only the prompts this method sends (the repair prompt is a fallback)
        used = ("single",) if method == "single" else ("stage1", "stage2", "stage3")
        versions = {k: v for k, v in versions.items() if k in used} or versions
        runs[run_id] = {
            "run_id": run_id, "label": labels.get(run_id, f"run {run_id}"),
            "backend": backend, "model": model, "method": method,
            "prompt_version": " ".join(f"{k}:{str(v)[:6]}" for k, v in sorted(versions.items())) or "-",
        }
    return runs


def human_flag_counts(db: sqlite_utils.Database) -> list[dict]:
    """Per run: decided pairs, and per stage how many items there were and were flagged."""
    runs = _runs(db)
    totals: dict[int, dict] = defaultdict(lambda: defaultdict(int))
    desc_sql = ("(SELECT COALESCE(SUM(json_array_length(j.value, '$.descriptors')), 0)"
                " FROM descriptions d, json_each(d.objects) j WHERE d.id = a.{col})")
    for run_id, pairs, s1, s2 in db.execute(
            f"SELECT a.run_id, COUNT(*), SUM({desc_sql.format(col='stage1_id')}),"
            f" SUM({desc_sql.format(col='stage2_id')}) FROM annotations a WHERE {_DECIDED} GROUP BY a.run_id"):
        totals[run_id].update({"pairs": pairs, "n_stage 1 descriptors": s1 or 0, "n_stage 2 descriptors": s2 or 0})
    for run_id, individual, compound in db.execute(
            "SELECT a.run_id, SUM(c.kind = 'individual'), SUM(c.kind = 'compound') FROM captions c"
            f" JOIN annotations a ON a.id = c.annotation_id WHERE {_DECIDED} GROUP BY a.run_id"):
        totals[run_id].update({"n_stage 3 captions": individual or 0, "n_stage 4 compounds": compound or 0})
    for run_id, f1, f2, f3, f4 in db.execute(
            "SELECT a.run_id,"
            " SUM(f.target_kind = 'descriptor' AND substr(f.target_id, 1, length(a.stage1_id) + 1) = a.stage1_id || '/'),"
            " SUM(f.target_kind = 'descriptor' AND substr(f.target_id, 1, length(a.stage2_id) + 1) = a.stage2_id || '/'),"
            " SUM(f.target_kind = 'caption' AND c.kind = 'individual'),"
            " SUM(f.target_kind = 'caption' AND c.kind = 'compound')"
            " FROM flags f JOIN annotations a ON a.id = f.annotation_id"
            " LEFT JOIN captions c ON f.target_kind = 'caption' AND c.id = f.target_id"
            f" WHERE f.removed_at IS NULL AND f.reviewer != ? AND {_DECIDED} GROUP BY a.run_id",
            [PIPELINE_REVIEWER]):
        totals[run_id].update({"f_stage 1 descriptors": f1 or 0, "f_stage 2 descriptors": f2 or 0,
                               "f_stage 3 captions": f3 or 0, "f_stage 4 compounds": f4 or 0})
    rows = []
    for run_id, info in runs.items():
        counts = totals.get(run_id, {})
        row = {**info, "pairs": counts.get("pairs", 0)}
        for stage in STAGES:
            row[stage] = {"items": counts.get(f"n_{stage}", 0), "flagged": counts.get(f"f_{stage}", 0)}
        rows.append(row)
    return rows


def rate(part: int, whole: int) -> Optional[float]:
    return part / whole if whole else None


def human_rates_by(rows: list[dict], key: str) -> dict[str, dict[str, Optional[float]]]:
    """Flag rates per stage, pooled over runs sharing `key` ('label', 'model', 'prompt_version')."""
    pooled: dict[str, dict[str, list[int]]] = defaultdict(lambda: {s: [0, 0] for s in STAGES})
    for row in rows:
        for stage in STAGES:
            pooled[row[key]][stage][0] += row[stage]["flagged"]
            pooled[row[key]][stage][1] += row[stage]["items"]
    return {group: {s: rate(*v) for s, v in stages.items()} for group, stages in pooled.items()}


# progress(done, total, what): how far a long scoring pass is (the app shows it).
Progress = Callable[[int, int, str], None]

_FLAG_PARTS = ("descriptors", "captions")


class GroundTruthCache:
    """Ground-truth scores kept per pair between calls: a done pair's answers never change
    (store.annotations.complete_annotation), so each pair is scored once; which pairs are
    decided and their flags are read afresh on each call, and a pair's flags are matched
    against its truth again only when they changed. After one approval, flag or caption
    edit, the Stats tab scores at most that one pair instead of the whole run.

    pairs_scored and pairs_matched count that work (the tests read them)."""

    def __init__(self):
        self._scores: dict[str, Any] = {}    # annotation id -> pipeline.scoring.AnnotationScore
        # annotation id -> (its active reviewer flags, its counts: see _flag_counts)
        self._matched: dict[str, tuple[tuple, tuple]] = {}
        self._lock = threading.Lock()
        self.pairs_scored = 0
        self.pairs_matched = 0

    def _scores_of(self, db, annotation_ids: list[str], progress: Optional[Progress]) -> list:
        from pipeline.scoring import score_annotations

        missing = [a for a in annotation_ids if a not in self._scores]
        for i, score in enumerate(score_annotations(db, missing)):
            score.caption_texts = []  # not needed for the rates; 20,000 pairs' texts are MBs
            self._scores[score.annotation_id] = score
            self.pairs_scored += 1
            if progress and (i % 200 == 0 or i + 1 == len(missing)):
                progress(i + 1, len(missing), "scoring pairs against ground truth")
        return [self._scores[a] for a in annotation_ids]

    def score(self, db, run_id: int, progress: Optional[Progress] = None) -> Optional[dict]:
        """pipeline.scoring.score_run(db, run_id) of the run's done pairs, scoring only the
        pairs not scored before."""
        try:
            from pipeline.scoring import summarize_run
        except ImportError:
            return None
        from store.annotations import get_run

        ids = [r[0] for r in db.execute(
            "SELECT id FROM annotations WHERE run_id = ? AND status = 'done' ORDER BY seq", [run_id])]
        with self._lock:
            scores = self._scores_of(db, ids, progress)
        return summarize_run(get_run(db, run_id), scores)

    def flags(self, db, run_id: int, progress: Optional[Progress] = None) -> Optional[dict]:
        """Per part (descriptors, captions): hallucinated, flagged, caught, recall and
        precision over the run's decided pairs, each pair counted as
        pipeline.scoring.score_flags(db, pair) counts it; 'annotations': pairs scored."""
        try:
            from pipeline.scoring import flag_sets
        except ImportError:
            return None
        # Only pairs a reviewer decided on: an unreviewed pair's hallucinations were not
        # missed by anyone.
        ids = [r[0] for r in db.execute(
            f"SELECT a.id FROM annotations a WHERE a.run_id = ? AND {_DECIDED} ORDER BY a.seq", [run_id])]
        flags_of: dict[str, list] = defaultdict(list)
        for annotation_id, *flag in db.execute(
                "SELECT f.annotation_id, f.reviewer, f.target_kind, f.target_id FROM flags f"
                " JOIN annotations a ON a.id = f.annotation_id"
                f" WHERE a.run_id = ? AND {_DECIDED} AND f.removed_at IS NULL AND f.reviewer != ? ORDER BY f.id",
                [run_id, PIPELINE_REVIEWER]):
            flags_of[annotation_id].append(tuple(flag))
        totals = [0] * 7
        with self._lock:
            for score in self._scores_of(db, ids, progress):
                flags = tuple(flags_of.get(score.annotation_id, ()))
                hit = self._matched.get(score.annotation_id)
                if hit is None or hit[0] != flags:
                    hit = (flags, _flag_counts(flag_sets(score, flags)))
                    self._matched[score.annotation_id] = hit
                    self.pairs_matched += 1
                totals = [a + b for a, b in zip(totals, hit[1])]
        out: dict[str, Any] = {"annotations": totals[0]}
        for i, part in enumerate(_FLAG_PARTS):
            hallucinated, flagged, caught = totals[1 + 3 * i:4 + 3 * i]
            out[part] = {"hallucinated": hallucinated, "flagged": flagged, "caught": caught,
                         "recall": rate(caught, hallucinated), "precision": rate(caught, flagged)}
        return out


def _flag_counts(found: Optional[tuple[set, set, set, set]]) -> tuple:
    """(scored, then hallucinated, flagged, caught of descriptors and of captions) of one pair."""
    if found is None:
        return (0,) * 7
    true_desc, true_caps, flag_desc, flag_caps = found
    return (1, len(true_desc), len(flag_desc), len(true_desc & flag_desc),
            len(true_caps), len(flag_caps), len(true_caps & flag_caps))


def has_ground_truth(db, run_id: int) -> bool:
    """Whether any done pair of the run has demo-world ground truth (else scoring is moot)."""
    return db.execute(
        "SELECT 1 FROM annotations a JOIN pairs p ON p.id = a.pair_id WHERE a.run_id = ? AND a.status = 'done'"
        " AND p.ground_truth IS NOT NULL LIMIT 1", [run_id]).fetchone() is not None


GT_MEASURES = (
    ("stage1", "object_rate", "S1 objects"), ("stage1", "attribute_rate", "S1 attributes"),
    ("stage2", "object_rate", "S2 objects"), ("stage2", "attribute_rate", "S2 attributes"),
    ("captions", "invented_rate", "captions inventing a change"),
    ("captions", "missed_rate", "changes missed"),
)


def ground_truth_rates(db, cache: GroundTruthCache,
                       progress: Optional[Progress] = None) -> dict[str, dict[str, Optional[float]]]:
    """Per run with ground truth: the GT_MEASURES rates."""
    out = {}
    for run_id, info in _runs(db).items():
        if not has_ground_truth(db, run_id):
            continue
        try:
            result = cache.score(db, run_id, progress)
        except Exception as exc:  # one run the scorer cannot read must not hide the others
            log.warning("ground-truth scoring of run %s failed: %s", run_id, exc)
            continue
        if not result or not result.get("pairs_scored"):
            continue
        out[info["label"]] = {label: (result.get(part) or {}).get(key) for part, key, label in GT_MEASURES}
    return out


def flag_catch_rows(db, cache: GroundTruthCache, progress: Optional[Progress] = None) -> list[list]:
    """Per run with ground truth and flags: how many true hallucinations the flags caught."""
    rows = []
    for run_id, info in _runs(db).items():
        flagged = db.execute("SELECT COUNT(*) FROM flags f JOIN annotations a ON a.id = f.annotation_id"
                             " WHERE a.run_id = ? AND f.removed_at IS NULL AND f.reviewer != ?",
                             [run_id, PIPELINE_REVIEWER]).fetchone()[0]
        if not flagged or not has_ground_truth(db, run_id):
            continue
        try:
            result = cache.flags(db, run_id, progress)
        except Exception as exc:
            log.warning("flag scoring of run %s failed: %s", run_id, exc)
            continue
        if not result or not result.get("annotations"):
            continue

        def pct(value):
            return "-" if value is None else f"{100 * value:.0f}%"

        for part in ("descriptors", "captions"):
            r = result[part]
            rows.append([info["label"], part, r["hallucinated"], r["flagged"], r["caught"],
                         pct(r["recall"]), pct(r["precision"])])
    return rows


FLAG_CATCH_HEADERS = ["run", "items (decided pairs)", "truly hallucinated", "flagged", "caught", "recall",
                      "precision"]


def review_progress(db: sqlite_utils.Database) -> dict[str, dict[str, int]]:
    runs = _runs(db)
    out = {}
    for run_id, approved, rejected, unreviewed, flagged, pending, failed in db.execute(
            "SELECT run_id, SUM(status = 'done' AND review_status = 'approved'),"
            " SUM(status = 'done' AND review_status = 'rejected'),"
            " SUM(status = 'done' AND review_status = 'unreviewed'), SUM(status = 'done' AND flag_count > 0),"
            " SUM(status = 'pending'), SUM(status = 'failed') FROM annotations GROUP BY run_id"):
        label = runs.get(run_id, {}).get("label", f"run {run_id}")
        out[label] = {"approved": approved or 0, "rejected": rejected or 0, "unreviewed": unreviewed or 0,
                      "flagged": flagged or 0, "annotating": pending or 0, "failed": failed or 0}
    return out


_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


def caption_words(text: str) -> list[str]:
    """Lower-case words without punctuation: 'lamp.' and 'lamp' are one word, and two
    captions that differ only in case or a final stop are one caption."""
    return _WORD.findall(text.lower())


def caption_stats(db: sqlite_utils.Database, seed: int = 0) -> dict[str, dict]:
    """Per run: caption lengths (words, current text) and diversity: distinct-1 and
    distinct-2 (distinct n-grams / all n-grams, over caption_words) and the share of
    unique captions. Runs with many captions are sampled (MAX_CAPTIONS_FOR_DIVERSITY)."""
    runs = _runs(db)
    texts: dict[int, list[str]] = defaultdict(list)
    for run_id, text in db.execute(
            "SELECT a.run_id, COALESCE((SELECT e.text FROM caption_edits e WHERE e.caption_id = c.id"
            " ORDER BY e.version DESC LIMIT 1), c.text) FROM captions c JOIN annotations a ON a.id = c.annotation_id"
            " WHERE c.kind = 'individual'"):
        texts[run_id].append(text)
    out = {}
    rng = random.Random(seed)
    for run_id, items in texts.items():
        if len(items) > MAX_CAPTIONS_FOR_DIVERSITY:
            items = rng.sample(items, MAX_CAPTIONS_FOR_DIVERSITY)
        words = [caption_words(t) for t in items]
        unigrams = [w for ws in words for w in ws]
        bigrams = [tuple(ws[i:i + 2]) for ws in words for i in range(len(ws) - 1)]
        lengths = [len(ws) for ws in words]
        out[runs.get(run_id, {}).get("label", f"run {run_id}")] = {
            "captions": len(items), "lengths": lengths,
            "mean_words": sum(lengths) / len(lengths) if lengths else 0.0,
            "distinct_1": rate(len(set(unigrams)), len(unigrams)),
            "distinct_2": rate(len(set(bigrams)), len(bigrams)),
            "unique_share": rate(len(set(map(tuple, words))), len(items)),
        }
    return out


# ---------------------------------------------------------------- plots

def _figure(width=9.0, height=3.6):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _grouped_bars(ax, groups: dict[str, dict[str, Optional[float]]], measures: list[str], percent=True,
                  legend=None):
    import numpy as np

    x = np.arange(len(measures))
    width = 0.8 / max(1, len(groups))
    for i, (group, values) in enumerate(groups.items()):
        heights = [(values.get(m) or 0.0) * (100 if percent else 1) for m in measures]
        bars = ax.bar(x + i * width - 0.4 + width / 2, heights, width, label=group, color=f"C{i}")
        for bar, m in zip(bars, measures):
            if values.get(m) is None:
                bar.set_hatch("//")
                bar.set_alpha(0.3)
    ax.set_xticks(x, measures, fontsize=8)
    if percent:
        ax.set_ylabel("%")
    if groups and legend is not None:
        # in an empty axes under the bars: inside (upper right) it covered the last measure's
        # tallest bars, and beside them long run labels squeezed the bars' names together
        legend.set_axis_off()
        legend.legend(*ax.get_legend_handles_labels(), fontsize=7, loc="upper center", ncols=_legend_columns(groups))


def _legend_columns(groups) -> int:
    # two entries a line where two fit the figure's width (a run's label can be 100 characters)
    return 2 if max((len(str(g)) for g in groups), default=0) <= 60 else 1


def plot_human_rates(rows: list[dict]):
    keys = ("label", "model", "prompt_version")
    # A group with no decided pair has no rate: its bars, of zero height, do not show, so
    # its legend entry says why
    groups = [{(f"{group} (no decided pairs)" if all(v is None for v in rates.values()) else group): rates
               for group, rates in human_rates_by(rows, key).items()} for key in keys]
    # each panel's legend in a row of its own under it
    legend_heights = [0.15 + 0.13 * -(-len(g) // _legend_columns(g)) for g in groups]
    fig = _figure(10, 6.3 + sum(legend_heights))
    axes = fig.subplots(6, 1, height_ratios=[h for lh in legend_heights for h in (2.1, lh)])
    for ax, legend_ax, rates, title in zip(axes[0::2], axes[1::2], groups, ("run", "model", "prompt versions")):
        _grouped_bars(ax, rates, list(STAGES), legend=legend_ax)
        ax.set_title(f"Flagged as hallucination by reviewers (decided pairs), per {title}", fontsize=9)
    return fig


def plot_ground_truth(rates: dict[str, dict[str, Optional[float]]]):
    fig = _figure(10, 3.4 + 0.15 * len(rates))
    ax = fig.subplots()
    if not rates:
        ax.text(0.5, 0.5, "no run with demo-world ground truth yet", ha="center", va="center")
        ax.set_axis_off()
        return fig
    _grouped_bars(ax, rates, [label for _, _, label in GT_MEASURES])
    ax.set_title("Hallucination against ground truth (demo world), per run", fontsize=9)
    # under the axes, which keep the full width for the six measures' names
    fig.legend(fontsize=7, loc="outside lower center")
    return fig


def plot_review_progress(progress: dict[str, dict[str, int]]):
    fig = _figure(10, 0.9 + 0.5 * max(1, len(progress)))
    ax = fig.subplots()
    colours = {"approved": "#16a34a", "rejected": "#dc2626", "unreviewed": "#9ca3af",
               "annotating": "#93c5fd", "failed": "#111827"}
    labels = list(progress)
    left = [0] * len(labels)
    for part, colour in colours.items():
        values = [progress[label][part] for label in labels]
        ax.barh(labels, values, left=left, color=colour, label=part)
        left = [a + b for a, b in zip(left, values)]
    ax.set_title("Review progress (pairs)", fontsize=9)
    # under the axes: inside, it covered the first run's bar
    fig.legend(fontsize=7, ncols=5, loc="outside lower center")
    return fig


def plot_caption_stats(stats: dict[str, dict]):
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    fig = _figure(10, 3.4 + 0.15 * len(stats))
    ax_len, ax_div = fig.subplots(1, 2)
    for i, (label, s) in enumerate(stats.items()):
        if s["lengths"]:
            # one bar per whole number of words, centred on it
            ax_len.hist(s["lengths"], bins=np.arange(-0.5, max(s["lengths"]) + 1.5), alpha=0.5, label=label,
                        color=f"C{i}")
    ax_len.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_len.set_title("Caption length (words)", fontsize=9)
    _grouped_bars(ax_div, {k: {m: v[m] for m in ("distinct_1", "distinct_2", "unique_share")}
                           for k, v in stats.items()}, ["distinct_1", "distinct_2", "unique_share"])
    ax_div.set_title("Caption diversity", fontsize=9)
    if stats:  # one legend for both panels (a run has one colour in each), under them
        fig.legend(*ax_div.get_legend_handles_labels(), fontsize=7, loc="outside lower center")
    return fig


def summary_rows(rows: list[dict], captions: dict[str, dict]) -> list[list]:
    """One table row per run: decided pairs, flag rates per stage, caption length/diversity."""
    table = []
    for row in rows:
        c = captions.get(row["label"], {})

        def pct(stage):
            r = rate(row[stage]["flagged"], row[stage]["items"])
            return "-" if r is None else f"{100 * r:.1f}%"

        table.append([row["label"], row["model"], row["prompt_version"], row["pairs"],
                      *[pct(s) for s in STAGES], round(c.get("mean_words", 0.0), 1),
                      "-" if c.get("distinct_2") is None else round(c["distinct_2"], 3)])
    return table


SUMMARY_HEADERS = ["run", "model", "prompts", "decided pairs", *[f"flagged {s}" for s in STAGES],
                   "mean words", "distinct-2"]
