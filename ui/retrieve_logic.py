"""The Retrieve tab: a reference image (from the dataset or uploaded) plus a modification
text, answered with the top-k gallery images of the FAISS index built from the trained
fusion model (retrieval.index.QueryEngine, loaded once)."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import sqlite_utils

from .security import SecurityError, escape_text, image_url, uploaded_file


class RetrieveError(Exception):
    """A query the tab cannot answer, with the reason."""


@dataclass
class DatasetQuery:
    pair_id: str
    label: str
    reference_id: str
    reference_path: Optional[str]
    target_id: Optional[str]
    target_name: Optional[str]
    text: str


def dataset_queries(db: sqlite_utils.Database, limit: int = 300) -> list[DatasetQuery]:
    """Pairs to query with, test/val first: the modification text is the pair's current
    first caption (after edits) that no one flagged, from an approved annotation before an
    unreviewed one and never a rejected one; else its imported caption."""
    rows = db.execute(
        "SELECT p.id, p.external_id, p.split, p.reference_id, r.path, p.target_id, t.name, p.original_captions,"
        " (SELECT COALESCE((SELECT e.text FROM caption_edits e WHERE e.caption_id = c.id ORDER BY e.version DESC"
        "   LIMIT 1), c.text) FROM annotations a JOIN captions c ON c.annotation_id = a.id"
        "   WHERE a.pair_id = p.id AND a.status = 'done' AND c.kind = 'individual'"
        "   AND a.review_status != 'rejected' AND NOT EXISTS (SELECT 1 FROM flags f WHERE f.target_kind = 'caption'"
        "     AND f.target_id = c.id AND f.removed_at IS NULL)"
        "   ORDER BY a.review_status = 'approved' DESC, a.run_id DESC, c.position"
        "   LIMIT 1)"
        " FROM pairs p JOIN images r ON r.id = p.reference_id LEFT JOIN images t ON t.id = p.target_id"
        " ORDER BY CASE p.split WHEN 'test' THEN 0 WHEN 'val' THEN 1 ELSE 2 END, p.rowid LIMIT ?", [limit]).fetchall()
    out = []
    for pair_id, external_id, split, ref_id, ref_path, target_id, target_name, originals, caption in rows:
        originals = json.loads(originals or "[]")
        text = caption or (originals[0] if originals else "")
        out.append(DatasetQuery(
            pair_id=pair_id, label=f"{external_id or pair_id} · {split or '-'} · {text[:60]}",
            reference_id=ref_id, reference_path=ref_path, target_id=target_id, target_name=target_name, text=text))
    return out


def load_upload(upload):
    """The uploaded reference image as 8-bit RGB, or RetrieveError naming the file.

    The tab's image box hands over what the browser uploaded without Gradio's own
    decoding (a dict with the cached file's path and its original name), because that
    decoding turns a file that is not an image into a long internal error. A PIL image
    is taken as it is."""
    from PIL import Image

    from store.errors import ImageError
    from store.images import load_image_rgb

    if isinstance(upload, Image.Image):
        return upload
    path, name = _uploaded_path(upload)
    try:
        return load_image_rgb(path)
    except ImageError as exc:
        reason = str(exc).removeprefix(f"{path}: ")  # Gradio's copy of the file: not a name the user knows
        if reason.startswith("not an image file"):
            raise RetrieveError(
                f"the uploaded file {name!r} is not an image that can be read: upload a PNG, JPEG, WebP, GIF "
                "or BMP file") from None
        # An image too large to decode safely, or cut short: "upload a PNG" would be no help.
        raise RetrieveError(f"the uploaded file {name!r} cannot be used: {reason}") from None


def upload_hash(upload) -> Optional[str]:
    """The uploaded file's content hash (the store's image id for the same file), so an
    uploaded gallery image is left out of its own results as a dataset reference is."""
    from store.images import hash_file

    if not isinstance(upload, dict):
        return None
    return hash_file(_uploaded_path(upload)[0])


def _uploaded_path(upload) -> tuple[str, str]:
    """(path, original name) of a file Gradio received as an upload, or RetrieveError."""
    path = upload.get("path") if isinstance(upload, dict) else None
    name = (upload.get("orig_name") if isinstance(upload, dict) else None) or (Path(path).name if path else "")
    if not path:
        raise RetrieveError("the upload did not arrive: upload the reference image again")
    try:
        return uploaded_file(path), name  # not any path an API call names
    except SecurityError:
        raise RetrieveError("the upload did not arrive: upload the reference image again") from None


class RetrieveService:
    """Loads the QueryEngine on first use and keeps it (it is thread-safe)."""

    def __init__(self, db_path: str, index_path: Optional[str]):
        self.db_path = db_path
        self.index_path = index_path
        self._engine = None
        self._lock = threading.Lock()
        self._path_to_id: Optional[dict[str, str]] = None
        self._indexed_ids: Optional[set] = None

    @property
    def available(self) -> bool:
        return bool(self.index_path)

    def engine(self):
        if not self.index_path:
            raise RetrieveError(
                "no retrieval index: start the app with --index DIR (built by `good4cir index`)")
        with self._lock:
            if self._engine is None:
                from retrieval.index import CheckpointGoneError, QueryEngine

                try:
                    self._engine = QueryEngine(self.index_path)
                except CheckpointGoneError as exc:  # the app takes no --checkpoint, unlike query
                    raise RetrieveError(
                        f"cannot load the index {self.index_path}: it was built with the checkpoint "
                        f"{exc.checkpoint_dir}, which is no longer there: put the checkpoint back there, or "
                        "rebuild the index with `good4cir index` and restart the app with it") from None
                except (FileNotFoundError, ValueError) as exc:
                    raise RetrieveError(f"cannot load the index {self.index_path}: {exc}") from None
            return self._engine

    def image_ids(self, db) -> dict[str, str]:
        """Resolved file path -> image id, to show gallery hits through the image route."""
        if self._path_to_id is None:
            self._path_to_id = {
                str(Path(path).resolve()): image_id
                for image_id, path in db.execute("SELECT id, path FROM images WHERE path IS NOT NULL")}
        return self._path_to_id

    def query(self, db, *, pair: Optional[DatasetQuery], upload, text: str, k: int) -> list[dict]:
        """Top-k hits as dicts: rank, name, score, stage, first_stage_score, image_id,
        is_target (`retrieval.index.Hit`: score is on the scale of its stage)."""
        from store.errors import ImageError

        text = (text or "").strip()
        if not text:
            raise RetrieveError("type a modification text")
        try:  # the API (api_name="retrieve") takes any value, not only the slider's
            k = int(k)
        except (TypeError, ValueError):
            raise RetrieveError(f"top k must be a whole number, got {k!r}") from None
        if k < 1:
            raise RetrieveError(f"top k must be at least 1, got {k}")
        extra: tuple[str, ...] = ()
        if upload is not None:
            image, exclude = load_upload(upload), False
            digest = upload_hash(upload)
            extra = (digest,) if digest else ()
        elif pair is not None and pair.reference_path:
            image, exclude = pair.reference_path, True
        elif pair is not None:  # imported by URL (good4cir JSON): the store has no file for it
            raise RetrieveError(f"the reference image of pair {pair.label.split(' · ')[0]} is not a local "
                                "file (the store holds its URL only): upload it instead")
        else:
            raise RetrieveError("choose a dataset pair or upload a reference image")
        try:
            hits = self.engine().query(image, text, k=k, exclude_reference=exclude, exclude=extra)
        except (FileNotFoundError, ImageError) as exc:
            if upload is not None:
                raise
            # The store names a file that was moved, deleted or damaged since the import.
            raise RetrieveError(f"the reference image of pair {pair.label.split(' · ')[0]} cannot be "
                                f"read: {exc}") from None
        ids = self.image_ids(db)
        target_id = pair.target_id if (pair is not None and upload is None) else None
        out = []
        for rank, hit in enumerate(hits, start=1):
            image_id = ids.get(str(Path(hit.path).resolve())) if hit.path else None
            out.append({"rank": rank, "name": hit.name, "score": hit.score, "stage": hit.stage,
                        "first_stage_score": hit.first_stage_score, "image_id": image_id,
                        "is_target": bool(target_id and image_id == target_id),
                        # moved or deleted since `index` read it: no picture to show
                        "file_missing": bool(hit.path) and not os.path.isfile(hit.path)})
        return out

    def search_html(self, db, *, pair: Optional[DatasetQuery], upload, text: str, k: int) -> str:
        """The Retrieve tab's answer to a search: `query`'s hits as HTML."""
        hits = self.query(db, pair=pair, upload=upload, text=text, k=k)
        indexed = pair is None or upload is not None or self.in_index(pair.target_id)
        scope, other_store = self.index_scope()
        html = render_results_html(hits, pair, uploaded=upload is not None, target_in_index=indexed,
                                   index_scope=scope)
        if other_store and hits and not any(hit["image_id"] for hit in hits):
            html = (f"<p>The index was {escape_text(scope)}, not from this one, so its images are not shown: "
                    "start the app with that store (--db), or index this one (good4cir index).</p>" + html)
        # What the command line prints as warnings: a model that is not the index's, a
        # text the model reads only the start of.
        engine = self.engine()
        notes = [note for note in (engine.model_note, engine.text_note((text or "").strip())) if note]
        return "".join(f"<p class='g4c-warn' style='color: #b45309'>⚠ {escape_text(note[0].upper() + note[1:])}.</p>" for note in notes) + html

    def index_scope(self) -> tuple[str, bool]:
        """What the index was built from, in words, and whether that is another store."""
        meta = self.engine().index.meta
        split = f"split {meta['split']} of " if meta.get("split") else ""
        if not meta.get("db"):
            return "built from other images", False
        if Path(meta["db"]).resolve() == Path(self.db_path).resolve():
            return f"built from {split or 'all of '}this store", False
        return f"built from {split}the store {meta['db']}", True

    def in_index(self, image_id: Optional[str]) -> bool:
        """Whether the index holds this store image (an index of one split holds no other's)."""
        if self._indexed_ids is None:
            self._indexed_ids = {entry.image_id for entry in self.engine().index.entries}
        return image_id in self._indexed_ids


def render_results_html(hits: list[dict], pair: Optional[DatasetQuery], uploaded: bool,
                        target_in_index: bool = True, index_scope: str = "built from other images") -> str:
    if not hits:
        return "<div class='g4c-muted'>No results.</div>"
    from retrieval.index import RERANK_STAGE

    cards = []
    # Past the re-ranker's depth hits keep the fusion model's cosine, another scale.
    reranked = sum(1 for h in hits if h.get("stage") == RERANK_STAGE)
    mixed = 0 < reranked < len(hits)
    for hit in hits:
        url = image_url(hit["image_id"]) if hit["image_id"] else None
        if hit.get("file_missing"):
            img = "<div class='g4c-noimg'>file not found (moved or deleted since indexing)</div>"
        elif url:
            img = f"<img src='{escape_text(url)}' alt='{escape_text(hit['name'])}'>"
        else:
            img = "<div class='g4c-noimg'>not in the store</div>"
        mark = " ✔ true target" if hit["is_target"] else ""
        stage = " (first stage)" if mixed and hit.get("stage") != RERANK_STAGE else ""
        cards.append(
            f"<div class='g4c-result{' g4c-true' if hit['is_target'] else ''}'>{img}"
            f"<div><b>#{hit['rank']}</b> · {hit['score']:.3f}{stage}{escape_text(mark)}</div>"
            f"<div class='g4c-muted'>{escape_text(hit['name'])}</div></div>")
    note = (f"<p class='g4c-muted'>#1-#{reranked} in the re-ranker's order, with its scores; the rest in "
            "the fusion model's order, with its cosine scores (another scale).</p>" if mixed else "")
    if pair is not None and not uploaded:
        found = [h["rank"] for h in hits if h["is_target"]]
        if found:
            note += f"<p>True target {escape_text(pair.target_name)}: rank {found[0]}</p>"
        elif not target_in_index:  # not a miss of the model's: no k would find it
            note += (f"<p>True target {escape_text(pair.target_name or '-')} is not in the index "
                     f"({escape_text(index_scope)}).</p>")
        else:
            note += f"<p>True target {escape_text(pair.target_name or '-')} is not in the top {len(hits)}.</p>"

    return note + "<div class='g4c-results'>" + "".join(cards) + "</div>"


def render_reference_html(pair: Optional[DatasetQuery]) -> str:
    if pair is None:
        return ""
    url = image_url(pair.reference_id)
    return (f"<div class='g4c-result g4c-ref'><img src='{escape_text(url)}' alt='reference'>"
            f"<div>reference of pair {escape_text(pair.label.split(' · ')[0])}</div></div>")
