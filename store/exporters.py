"""Export the store: the authors' dataset.json, CIRR caption JSON, JSONL with provenance.

Rules shared by all formats: for each pair, the newest finished annotation (or the one
of `run_id`); only approved ones unless include_unreviewed (rejected ones never); each
caption's current text (edits win over the VLM's); flagged captions (and compounds built
from a flagged caption) left out unless include_flagged; a compound that still quotes a
caption whose text a reviewer changed (and was not edited itself) left out, since it
carries the text the edit replaced. With include_unreviewed and no run chosen, a pair
that has no annotation is exported with its imported captions, so an imported dataset
can be written back unchanged; with a run chosen, only the pairs it annotated go out.
"""

from __future__ import annotations

import glob
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import sqlite_utils
from tqdm import tqdm

from .annotations import get_run, require_split
from .db import transaction, utc_now
from .redaction import redact_url
from .models import AnnotationRecord, CaptionRecord, ImageRecord, PairRecord, RunRecord
from .review import caption_history, list_captions_of, list_flags, review_history

FORMATS = ("good4cir", "cirr", "jsonl")
_CHUNK = 500  # pairs per bulk read of captions and flags (under SQLite's variable limit)

_SECRET_KEY = re.compile(r"key|token|secret|password|passwd|authorization|bearer|credential", re.I)


@dataclass
class ExportItem:
    """One pair with everything an export format may need."""

    pair: PairRecord
    reference: ImageRecord
    target: Optional[ImageRecord]
    img_set: list[ImageRecord]
    annotation: Optional[AnnotationRecord]
    run: Optional[RunRecord]
    texts: list[str]                       # the captions to export, in order
    captions: list[CaptionRecord] = field(default_factory=list)   # annotation captions kept
    flagged_ids: set[str] = field(default_factory=set)
    gt_images: list[ImageRecord] = field(default_factory=list)   # CIRCO's further ground truths


def export_dataset(
    db: sqlite_utils.Database,
    format: str,
    out: str | Path,
    *,
    run_id: Optional[int] = None,
    include_unreviewed: bool = False,
    include_flagged: bool = False,
    split: Optional[str] = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the export to `out` (atomically) and return counts of what was written. A
    CIRR export also stores the pairids it gives generated captions (cirr_pairids)."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if run_id is not None:
        get_run(db, run_id)  # a clear NotFoundError for a wrong id
    require_split(db, split)
    stats = {"format": format, "out": str(out), "pairs": 0, "captions": 0,
             "flagged_captions_left_out": 0, "stale_compounds_left_out": 0,
             "pairs_without_captions": 0, "pairs_without_target": 0,
             "pairs_awaiting_review": 0, "pairs_rejected": 0, "pairs_not_annotated": 0,
             "pairs_withheld_target": 0, "pairs_not_in_run": 0, "pairs_imported_captions_replaced": 0, "awaiting_approved_in_runs": {},
             "splits": set()}  # of the pairs written: a CIRR file holds one (its name says which)
    items = collect_items(db, run_id=run_id, include_unreviewed=include_unreviewed,
                          include_flagged=include_flagged, split=split, stats=stats,
                          progress=progress)
    # Each format yields its text piece by piece, written as it comes: at tens of thousands
    # of pairs the whole file as one string (and the records it was made from) took many
    # times its size in memory.
    if format == "good4cir":
        chunks = _good4cir(items, stats)
    elif format == "cirr":
        chunks = _cirr(db, items, stats)
    else:
        chunks = _jsonl(db, items, stats)
    _write_atomically(Path(out), chunks)
    stats["splits"] = sorted(stats["splits"])
    return stats


def collect_items(
    db: sqlite_utils.Database,
    *,
    run_id: Optional[int] = None,
    include_unreviewed: bool = False,
    include_flagged: bool = False,
    split: Optional[str] = None,
    stats: Optional[dict] = None,
    progress: bool = False,
) -> Iterator[ExportItem]:
    """The pairs an export would write, in import order, with their chosen captions."""
    stats = stats if stats is not None else {"flagged_captions_left_out": 0, "stale_compounds_left_out": 0,
                                             "pairs_without_captions": 0}
    annotated, chosen = _chosen_annotations(db, run_id, include_unreviewed)
    awaiting = set() if include_unreviewed else _awaiting_review(db, run_id)
    if awaiting and run_id is None:
        stats["awaiting_approved_in_runs"] = _approved_elsewhere(db, awaiting)
    runs: dict[int, RunRecord] = {}
    sql = "SELECT * FROM pairs" + (" WHERE split = ?" if split else "") + " ORDER BY rowid"
    cursor = db.execute(sql, [split] if split else [])
    names = [d[0] for d in cursor.description]
    id_index, target_index = names.index("id"), names.index("target_id")
    # Decide from the raw rows first: most pairs of a big store are not exported.
    # With a run chosen, a pair that run did not annotate is left out: its imported
    # captions (or another run's) are not that run's.
    rows = [row for row in cursor.fetchall()
            if row[id_index] in chosen
            or (include_unreviewed and run_id is None and row[id_index] not in annotated)
            or _count_left_out(stats, row[id_index], annotated, awaiting, row[target_index] is None,
                               run_chosen=run_id is not None)]
    images = _ImageCache(db)
    bar = tqdm(total=len(rows), desc="export", unit="pair", disable=not progress, leave=False)
    for start in range(0, len(rows), _CHUNK):
        pairs = [PairRecord.from_row(dict(zip(names, row))) for row in rows[start:start + _CHUNK]]
        wanted = [chosen[p.id].id for p in pairs if p.id in chosen]
        captions_of = list_captions_of(db, wanted)
        flags_of = _caption_flags(db, wanted)
        for pair in pairs:
            bar.update(1)
            annotation = chosen.get(pair.id)
            if annotation is None:  # never annotated: its imported captions
                kept: list[CaptionRecord] = []
                flagged: set[str] = set()
                texts = list(pair.original_captions)
                run = None
            else:
                if annotation.run_id not in runs:
                    runs[annotation.run_id] = get_run(db, annotation.run_id)
                run = runs[annotation.run_id]
                flagged = flags_of.get(annotation.id, set())
                edited = {c.id for c in captions_of[annotation.id]
                          if c.current_text is not None and c.current_text != c.text}
                kept = []
                for caption in captions_of[annotation.id]:
                    if not include_flagged and (
                        caption.id in flagged or any(s in flagged for s in caption.sources or ())
                    ):
                        stats["flagged_captions_left_out"] += 1
                        continue
                    if caption.id not in edited and any(s in edited for s in caption.sources or ()):
                        stats["stale_compounds_left_out"] += 1
                        continue
                    kept.append(caption)
                texts = [c.current_text or c.text for c in kept]
            if not texts:
                stats["pairs_without_captions"] += 1
                continue
            if annotation is not None and pair.original_captions:
                # Only JSONL carries both; the other formats have one caption list.
                stats["pairs_imported_captions_replaced"] = stats.get("pairs_imported_captions_replaced", 0) + 1
            yield ExportItem(
                pair=pair, reference=images.get(pair.reference_id),
                target=images.get(pair.target_id) if pair.target_id else None,
                img_set=[images.get(i) for i in pair.img_set or ()],
                annotation=annotation, run=run, texts=texts, captions=kept, flagged_ids=flagged,
                gt_images=[images.get(i) for i in _gt_image_ids(pair) if images.has(i)],
            )
    bar.close()


def _count_left_out(stats: dict, pair_id: str, annotated: set[str], awaiting: set[str],
                    withheld: bool = False, *, run_chosen: bool = False) -> bool:
    """Count a pair the export leaves out for want of review (or of any annotation), so
    that an export made before reviewing says why it is empty; always False. A pair with
    no target (CIRR's test1) is counted apart: annotate leaves it out, it has only its
    imported captions. With a run chosen, a pair it did not annotate counts as such."""
    if run_chosen and pair_id not in annotated:
        stats["pairs_not_in_run"] = stats.get("pairs_not_in_run", 0) + 1
    elif pair_id in awaiting:
        stats["pairs_awaiting_review"] = stats.get("pairs_awaiting_review", 0) + 1
    elif pair_id in annotated:  # its annotation is finished, not awaiting and not chosen
        stats["pairs_rejected"] = stats.get("pairs_rejected", 0) + 1
    elif withheld:
        stats["pairs_withheld_target"] = stats.get("pairs_withheld_target", 0) + 1
    else:
        stats["pairs_not_annotated"] = stats.get("pairs_not_annotated", 0) + 1
    return False


def _gt_image_ids(pair: PairRecord) -> list[str]:
    """The store ids of a CIRCO pair's ground-truth images (the CIRCO importer keeps them).
    Those the store holds no image for (a store read from a JSONL export made before
    gt_images) are left to extra, as they were."""
    ids = (pair.extra or {}).get("gt_image_ids")
    return [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else []


def _newest_done(run_id: Optional[int]) -> str:
    """SQL: annotation `a` is the one an export takes for its pair (run_id's, or the newest finished)."""
    return ("a.run_id = ?" if run_id is not None else
            "a.run_id = (SELECT MAX(b.run_id) FROM annotations b"
            " WHERE b.pair_id = a.pair_id AND b.status = 'done')")


def _awaiting_review(db, run_id: Optional[int]) -> set[str]:
    """Pairs whose annotation an export would take is not reviewed yet."""
    return {row[0] for row in db.execute(
        f"SELECT a.pair_id FROM annotations a WHERE a.status = 'done' AND {_newest_done(run_id)}"
        " AND a.review_status = 'unreviewed'", [run_id] if run_id is not None else [])}


def _approved_elsewhere(db, awaiting: set[str]) -> dict[int, int]:
    """Run id -> how many of the `awaiting` pairs have an approved annotation of that run:
    a reviewer who approved one run's annotations before a newer run covered the same pairs
    exports them with --run, not by reviewing again."""
    counts: dict[int, int] = {}
    for pair_id, run_id in db.execute(
            "SELECT pair_id, MAX(run_id) FROM annotations WHERE status = 'done'"
            " AND review_status = 'approved' GROUP BY pair_id").fetchall():
        if pair_id in awaiting:
            counts[run_id] = counts.get(run_id, 0) + 1
    return dict(sorted(counts.items()))


def _caption_flags(db, annotation_ids: list[str]) -> dict[str, set[str]]:
    """annotation id -> ids of its captions that carry an active flag."""
    if not annotation_ids:
        return {}
    marks = ", ".join("?" for _ in annotation_ids)
    flags: dict[str, set[str]] = {}
    for annotation_id, target_id in db.execute(
        f"SELECT annotation_id, target_id FROM flags WHERE annotation_id IN ({marks})"
        " AND target_kind = 'caption' AND removed_at IS NULL", list(annotation_ids),
    ).fetchall():
        flags.setdefault(annotation_id, set()).add(target_id)
    return flags


def _chosen_annotations(db, run_id: Optional[int], include_unreviewed: bool
                        ) -> tuple[set[str], dict[str, AnnotationRecord]]:
    """(pairs that have a finished annotation, pair id -> that annotation when it is to be
    exported). Only the newest finished annotation counts (or the one of run_id): a
    pair whose newest one was rejected does not fall back to an older approved one."""
    newest = _newest_done(run_id)
    params = [run_id] if run_id is not None else []
    annotated = {row[0] for row in db.execute(
        f"SELECT a.pair_id FROM annotations a WHERE a.status = 'done' AND {newest}", params)}
    statuses = ("approved", "unreviewed") if include_unreviewed else ("approved",)
    cursor = db.execute(
        f"SELECT a.* FROM annotations a WHERE a.status = 'done' AND {newest}"
        f" AND a.review_status IN ({', '.join('?' for _ in statuses)})", [*params, *statuses])
    names = [d[0] for d in cursor.description]
    chosen = {}
    for row in cursor.fetchall():
        record = AnnotationRecord.from_row(dict(zip(names, row)))
        chosen[record.pair_id] = record
    return annotated, chosen


_IMAGE_COLUMNS = "id, name, path, url, root, width, height, size_bytes, format, split, created_at"


class _ImageCache:
    def __init__(self, db):
        self.db = db
        self.rows: dict[str, ImageRecord] = {}

    def has(self, image_id: str) -> bool:
        try:
            self.get(image_id)
        except LookupError:
            return False
        return True

    def get(self, image_id: str) -> ImageRecord:
        if image_id not in self.rows:
            # Not scene_json: no format writes it, and a demo world's scenes, parsed, took
            # more memory than the rest of an export.
            cursor = self.db.execute(f"SELECT {_IMAGE_COLUMNS} FROM images WHERE id = ?", [image_id])
            row = cursor.fetchone()
            if row is None:
                raise LookupError(f"image {image_id} is referenced by a pair but not stored")
            self.rows[image_id] = ImageRecord.from_row(dict(zip([d[0] for d in cursor.description], row)))
        return self.rows[image_id]


def _location(image: ImageRecord) -> str:
    return image.path or image.url or image.name


def _shared_location(image: ImageRecord) -> str:
    """The authors' format names images by URL where it can: an image imported from a
    URL goes out with that URL (shareable), not this machine's downloaded copy."""
    return image.url or _location(image)


# ---- formats -----------------------------------------------------------------------------

def _json_array(entries: Iterable[Any]) -> Iterator[str]:
    """The text of json.dumps(list(entries), indent=2, ensure_ascii=False) + "\\n", an entry
    at a time."""
    first = True
    for entry in entries:
        text = json.dumps(entry, indent=2, ensure_ascii=False)
        # An entry nested one level in: every line of it two spaces further in (strings
        # hold no raw newline in JSON, so a line break is always the dump's own).
        yield ("[\n  " if first else ",\n  ") + text.replace("\n", "\n  ")
        first = False
    yield "[]\n" if first else "\n]\n"


def _good4cir(items: Iterator[ExportItem], stats: dict) -> Iterator[str]:
    def entries():
        for item in items:
            if item.target is None:  # the authors' format has no target-less queries
                stats["pairs_without_target"] += 1
                continue
            stats["pairs"] += 1
            stats["splits"].add(str(item.pair.split))
            stats["captions"] += len(item.texts)
            yield {
                "reference_image": _shared_location(item.reference),
                "target_image": _shared_location(item.target),
                "difference_captions": item.texts,
            }

    return _json_array(entries())


def _cirr(db, items: Iterator[ExportItem], stats: dict) -> Iterator[str]:
    """One entry per caption, with cap.rc2.*.json's keys. An imported CIRR caption keeps
    its pairid and img_set id; any other caption gets the pairid the store gave it when
    it was first exported (cirr_pairids), so the same caption has the same pairid in
    every export, and no two captions share one across split files or with an imported
    pairid (CIRR numbers its queries once over all splits). Generated img_set ids are
    numbered after the largest kept in the file."""
    # Every caption is read before any pairid is given; what is kept of each until then
    # is its text and what its entry shares with its pair's other captions, not the
    # pair's records (ground truth, every caption's record): those took most of the memory.
    pending = []
    kept_set_ids: set[int] = set()
    for item in items:
        extra = item.pair.extra
        is_original = item.annotation is None
        names = extra.get("names") or {}
        members = [image.name for image in item.img_set]
        if isinstance(names.get("members"), list) and len(names["members"]) == len(members):
            members = list(names["members"])
        head: dict[str, Any] = {"reference": names.get("reference") or item.reference.name}
        if item.target is not None:
            target_name = names.get("target_hard") or item.target.name
            head["target_hard"] = target_name
            soft = extra.get("target_soft")
            head["target_soft"] = soft if isinstance(soft, dict) else {target_name: 1.0}
        ranks = extra.get("img_set_extra")  # CIRR's reference_rank, target_rank
        set_extra = ({k: v for k, v in ranks.items() if k not in ("id", "members")}
                     if isinstance(ranks, dict) and members == names.get("members") else {})
        shared = (head, members, set_extra)
        for index, text in enumerate(item.texts):
            pairid = extra.get("pairid") if is_original and index == 0 else None
            # An edited caption keeps its id, and so its pairid: it is the same query.
            key = f"{item.pair.id}:imported:{index}" if is_original else item.captions[index].id
            set_id = extra.get("img_set_id")
            if isinstance(set_id, int):
                kept_set_ids.add(set_id)
            # The dataset's own pairid as it was written (the importer takes "7" too), else
            # the caption's key, numbered below.
            kept = isinstance(pairid, (int, str)) and not isinstance(pairid, bool)
            pending.append((shared, text, pairid if kept else None, key, set_id))
        stats["pairs"] += 1
        stats["splits"].add(str(item.pair.split))
        stats["captions"] += len(item.texts)
    given = cirr_pairids(db, [key for _, _, pairid, key, _ in pending if pairid is None])
    next_set_id = max(kept_set_ids, default=-1) + 1
    set_ids: dict[tuple, int] = {}

    def entries():
        nonlocal next_set_id
        for (head, members, set_extra), text, pairid, key, set_id in pending:
            if pairid is None:
                pairid = given[key]
            if not isinstance(set_id, int):
                key = tuple(members)
                if key not in set_ids:
                    set_ids[key], next_set_id = next_set_id, next_set_id + 1
                set_id = set_ids[key]
            yield {"pairid": pairid, **head, "caption": text,
                   "img_set": {"id": set_id, "members": members, **set_extra}}

    return _json_array(entries())


def cirr_pairids(db: sqlite_utils.Database, caption_keys: list[str]) -> dict[str, int]:
    """{caption key: pairid}: the pairid each caption was given by an earlier CIRR export,
    and for the others (in the order given) new ones after the largest the store knows,
    given or imported (any split), stored in the same transaction."""
    found: dict[str, int] = {}
    if not caption_keys:  # imported captions only: nothing to write
        return found
    with transaction(db):
        for start in range(0, len(caption_keys), _CHUNK):
            chunk = caption_keys[start:start + _CHUNK]
            found.update(db.execute(
                f"SELECT caption_key, pairid FROM cirr_pairids WHERE caption_key IN ({', '.join('?' * len(chunk))})",
                chunk).fetchall())
        missing = [key for key in dict.fromkeys(caption_keys) if key not in found]
        if missing:
            top = db.execute(
                "SELECT MAX(n) FROM (SELECT MAX(pairid) AS n FROM cirr_pairids UNION ALL"
                " SELECT MAX(json_extract(extra, '$.pairid')) FROM pairs"
                " WHERE json_type(extra, '$.pairid') = 'integer' UNION ALL"
                " SELECT MAX(json_extract(extra, '$.original_pairid')) FROM pairs"
                " WHERE json_type(extra, '$.original_pairid') = 'integer')").fetchone()[0]
            first = -1 if top is None else top
            now = utc_now()
            new = {key: first + 1 + i for i, key in enumerate(missing)}
            db.conn.executemany("INSERT INTO cirr_pairids (caption_key, pairid, created_at) VALUES (?, ?, ?)",
                                [(key, pairid, now) for key, pairid in new.items()])
            found.update(new)
    return found


def _jsonl(db, items: Iterator[ExportItem], stats: dict) -> Iterator[str]:
    """One line per pair, readable back by the `pairs` importer, with provenance."""
    for item in items:
        pair = item.pair
        line: dict[str, Any] = {
            "id": pair.external_id or pair.id,
            "reference": _location(item.reference),
            "target": _location(item.target) if item.target else None,
            "split": pair.split,
            "captions": item.texts,
        }
        if pair.img_set is not None:
            line["img_set"] = [_location(image) for image in item.img_set]
        if item.gt_images:
            # By location, as img_set: extra's gt_image_ids are this store's ids, and a store
            # or `--data` reading the file back holds no image under them, so CIRCO's mAP
            # lost every ground truth but the target.
            line["gt_images"] = [_location(image) for image in item.gt_images]
        if pair.ground_truth is not None:
            line["edits"] = pair.ground_truth
        line.update({
            "pair_id": pair.id, "source": pair.source, "extra": pair.extra,
            "original_captions": pair.original_captions,
            "provenance": _provenance(db, item),
        })
        stats["pairs"] += 1
        stats["splits"].add(str(item.pair.split))
        stats["captions"] += len(item.texts)
        yield json.dumps(line, ensure_ascii=False, sort_keys=False) + "\n"


def _provenance(db, item: ExportItem) -> dict[str, Any]:
    if item.annotation is None:
        return {"captions_from": "import", "source": item.pair.source}
    run, annotation = item.run, item.annotation
    return {
        "captions_from": "annotation",
        "run": {
            "id": run.id, "name": run.name, "backend": run.backend, "model": run.model,
            "base_url": redact_url(run.base_url), "method": run.method,
            "prompt_versions": run.prompt_versions, "settings": scrub_secrets(run.settings),
        },
        "annotation": {
            "id": annotation.id, "review_status": annotation.review_status,
            "reviewer": annotation.reviewer, "reviewed_at": annotation.reviewed_at,
            "note": annotation.note, "flag_count": annotation.flag_count,
            "stage1_id": annotation.stage1_id, "stage2_id": annotation.stage2_id,
        },
        "captions": [
            {
                "id": c.id, "kind": c.kind, "position": c.position, "text": c.current_text,
                "original_text": c.text, "version": c.version, "flagged": c.id in item.flagged_ids,
                "edits": [e.model_dump(exclude={"id", "caption_id"}) for e in caption_history(db, c.id)],
            }
            for c in item.captions
        ],
        "flags": [f.model_dump(exclude={"id", "annotation_id"}) for f in list_flags(db, annotation.id)],
        "review_events": [e.model_dump(exclude={"id", "annotation_id"}) for e in review_history(db, annotation.id)],
    }


def scrub_secrets(value: Any) -> Any:
    """Drop anything that looks like a credential (API keys never leave the store)."""
    if isinstance(value, dict):
        return {k: scrub_secrets(v) for k, v in value.items() if not _SECRET_KEY.search(str(k))}
    if isinstance(value, list):
        return [scrub_secrets(v) for v in value]
    if isinstance(value, str) and re.match(r"^(sk-|Bearer )", value):
        return "[redacted]"
    return value


def _write_atomically(path: Path, chunks: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: it makes the file private (0600), and an export is meant to be shared;
    # a file opened anew gets the usual mode (0666 less the umask).
    temp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    started = time.time()
    try:
        with open(temp, "x", encoding="utf-8") as out:
            for chunk in chunks:
                out.write(chunk)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _remove_stale_temporaries(path, started)


def _remove_stale_temporaries(path: Path, before: float) -> None:
    """Remove the temporaries of `path` that a killed export (`kill -9`) left: each run
    writes a new name, so none is ever written over. One changed since this export began
    may be another export's, still being written: it is left alone."""
    own = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{32}}\.tmp")
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            if own.fullmatch(candidate.name) and candidate.stat().st_mtime < before:
                candidate.unlink()
        except OSError:  # gone already, or not ours to remove: the export itself is written
            pass
