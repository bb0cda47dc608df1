"""Training and evaluation triplets (reference image, modification text, target image).

Triplets come from one or more stores and/or exported files, mixed (the paper's
CIRR + CIRRR + Hotel-CIR "soup"). Images are keyed by the sha256 of their bytes, so an
image present in two datasets is one image, and caches keyed by it survive re-imports.

Caption sources (`--source`):
- `original`: the captions a dataset came with (CIRR's own, the demo world's ground truth);
- `generated`: the pipeline's captions of approved pairs, individual and/or stage 4
  compound (`--captions`), chosen by `good4cir export`'s rules (`store.exporters`): the
  newest finished annotation only, edited text wins, flagged captions and compounds built
  on them left out, and so are compounds still quoting a caption a reviewer edited;
- `both`: the two together;
- `auto` (default): the generated captions where a pair has any, else the original.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

from store.db import open_db
from store.exporters import collect_items
from store.images import hash_file

log = logging.getLogger(__name__)

SOURCES = ("auto", "original", "generated", "both")
CAPTION_KINDS = ("individual", "compound", "both")


@dataclass
class Triplet:
    pair_id: str
    reference: str  # image key (sha256 of the file)
    target: Optional[str]  # None only with keep_targetless (CIRR test1, CIRCO test)
    captions: list[str]
    caption_kinds: list[str]  # per caption: original / individual / compound
    split: Optional[str] = None
    source: str = ""
    img_set: Optional[list[str]] = None  # image keys, CIRR-style group incl. ref and target
    extra: dict[str, Any] = field(default_factory=dict)
    ground_truth: Any = None
    # How many ground truths (the target and CIRCO's further ones) the dataset names, those
    # without an image here too: CIRCO's mAP divides by it (`named_ground_truths`).
    ground_truths_named: int = 1
    dataset: str = ""  # the --db or --data it came from (load_triplets)


@dataclass
class TripletSet:
    triplets: list[Triplet]
    image_paths: dict[str, str]  # image key -> local file path
    problems: list[str] = field(default_factory=list)  # per-item reasons for what was left out
    image_names: dict[str, str] = field(default_factory=dict)  # image key -> the dataset's name

    def split(self, name: Optional[str]) -> list[Triplet]:
        if name is None:
            return list(self.triplets)
        return [t for t in self.triplets if t.split == name]

    def gallery_keys(self, triplets: Sequence[Triplet]) -> list[str]:
        """Every image of these triplets (references, targets, image-set members), once."""
        seen: dict[str, None] = {}
        for t in triplets:
            for key in [t.reference, t.target, *(t.img_set or []),
                        *((t.extra or {}).get("gt_image_ids") or [])]:
                if key in self.image_paths:
                    seen.setdefault(key, None)
        return list(seen)


def _check_options(source: str, captions: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"--source must be one of {', '.join(SOURCES)}, not {source!r}")
    if captions not in CAPTION_KINDS:
        raise ValueError(f"--captions must be one of {', '.join(CAPTION_KINDS)}, not {captions!r}")


def _pick_captions(original: list[str], generated: list[tuple[str, str]], source: str,
                   captions: str) -> tuple[list[str], list[str]]:
    kinds_wanted = {"individual", "compound"} if captions == "both" else {captions}
    gen = [(text, kind) for text, kind in generated if kind in kinds_wanted]
    orig = [(text, "original") for text in original if text and text.strip()]
    if source == "original":
        chosen = orig
    elif source == "generated":
        chosen = gen
    elif source == "both":
        chosen = orig + gen
    else:
        chosen = gen or orig
    seen: dict[str, str] = {}
    for text, kind in chosen:
        seen.setdefault(text.strip(), kind)
    return list(seen), list(seen.values())


def load_store_triplets(
    db_path: str | Path,
    *,
    source: str = "auto",
    captions: str = "both",
    include_unreviewed: bool = False,
    splits: Optional[Iterable[str]] = None,
    keep_targetless: bool = False,
) -> TripletSet:
    """Triplets of one store. Pairs without a usable caption or a local image are left
    out, each with its reason in `problems`; so are pairs without a target (test splits
    that withhold it) unless `keep_targetless`, for test-server submissions."""
    _check_options(source, captions)
    db_path = Path(db_path)
    if not db_path.is_file():
        raise FileNotFoundError(f"store {db_path} does not exist")
    db = open_db(db_path)
    try:
        images = {}
        names = {}
        for image_id, path, url, name in db.execute("SELECT id, path, url, name FROM images"):
            images[image_id] = (path, url)
            names[image_id] = name
        # The exporter's choice, so training reads what `good4cir export` would write.
        generated: dict[str, list[tuple[str, str]]] = {}
        for item in collect_items(db, include_unreviewed=include_unreviewed):
            if item.annotation is not None:
                generated[item.pair.id] = [(c.current_text or c.text, c.kind) for c in item.captions
                                           if (c.current_text or c.text).strip()]
        cursor = db.execute(
            "SELECT id, source, reference_id, target_id, split, original_captions, img_set,"
            " ground_truth, extra, external_id FROM pairs ORDER BY id"
        )
        rows = cursor.fetchall()
        # Pairs whose generated captions only wait for a review, to say so when they are all
        # a --source generated run could have used, or (auto) a pair with no imported caption:
        # a user's own images, trained right after `annotate`.
        awaiting_review: set[str] = set()
        if not include_unreviewed and (source == "generated" or (source == "auto" and any(
                row[0] not in generated and not _json(row[5], []) for row in rows))):
            awaiting_review = {item.pair.id for item in collect_items(db, include_unreviewed=True)
                               if item.annotation is not None and item.captions} - set(generated)
        # The review of each pair's newest finished annotation (the one export takes), to say
        # why a pair has no generated caption to give.
        reviewed = dict(db.execute("SELECT pair_id, review_status FROM annotations WHERE status = 'done'"
                                   " ORDER BY run_id").fetchall()) if source != "original" else {}
    finally:
        db.conn.close()
    wanted_splits = set(splits) if splits is not None else None
    result = TripletSet([], {})
    # Whether each image has its file, looked up once: pairs share images (a reference in
    # many pairs, image sets), and each look is a stat, slow on a network disk; pair by
    # pair it was ~16 stats a pair (160,000 for 10,000 pairs over 11,000 images).
    found: dict[str, bool] = {}

    def usable(key: Optional[str]) -> bool:
        if key not in found:
            found[key] = _usable(images.get(key))
        return found[key]

    for pair_id, pair_source, ref, tgt, split, orig_json, img_set_json, gt_json, extra_json, external_id in rows:
        if wanted_splits is not None and split not in wanted_splits:
            continue
        label = external_id or pair_id  # as the user's dataset and the review app name it
        if tgt is None and not keep_targetless:
            result.problems.append(f"pair {label}: no target (split {split} withholds it)")
            continue
        missing = [key for key in (ref, tgt) if key is not None and not usable(key)]
        if missing:
            path, url = images.get(missing[0]) or (None, None)
            result.problems.append(f"pair {label}: image {names.get(missing[0]) or missing[0][:12]} has no "
                                   f"local file ({path or url or 'no path'}: remote or missing)")
            continue
        texts, kinds = _pick_captions(
            _json(orig_json, []), generated.get(pair_id, []), source, captions
        )
        if not texts:
            result.problems.append(f"pair {label}: no caption for --source {source}" + _why_no_generated(
                pair_id in awaiting_review, reviewed.get(pair_id), generated.get(pair_id), captions))
            continue
        img_set = [k for k in _json(img_set_json, None) or [] if usable(k)] or None
        extra = _json(extra_json, {}) or {}
        for key in [ref, tgt, *(img_set or []), *(extra.get("gt_image_ids") or [])]:
            if usable(key):
                result.image_paths[key] = images[key][0]
                result.image_names[key] = names[key]
        result.triplets.append(Triplet(
            pair_id=pair_id, reference=ref, target=tgt, captions=texts, caption_kinds=kinds,
            split=split, source=pair_source, img_set=img_set, extra=extra,
            ground_truth=_json(gt_json, None),
            ground_truths_named=named_ground_truths(ref, tgt, extra),
        ))
    return result


def _why_no_generated(awaiting: bool, review: Optional[str], generated: Optional[list], captions: str) -> str:
    """Why a pair gave no generated caption, for its 'no caption' problem ("" if never annotated)."""
    if awaiting:
        return (" (its generated captions are not approved yet: approve them in the review app, "
                "or pass --include-unreviewed)")
    if review == "rejected":
        return " (its generated captions were rejected in review)"
    if generated:
        return f" (it has no {captions} generated captions: try --captions both)"
    if review == "approved":
        return " (every generated caption of it is flagged, or a compound quoting an edited caption)"
    return ""


def named_ground_truths(reference: Optional[str], target: Optional[str], extra: dict,
                        missing: int = 0) -> int:
    """How many ground truths a pair's dataset names: its target and extra's gt_image_ids
    (image keys), or CIRCO's own gt_img_ids with its target_img_id (CIRCO ids, which also
    count the ground truths whose image was missing at import), whichever names more, plus
    `missing` further ones a file named by a location that is not there. The reference is
    never one (the ranking leaves it out)."""
    keys = dict.fromkeys(k for k in [target, *(extra.get("gt_image_ids") or [])]
                         if isinstance(k, str) and k != reference)
    count = len(keys) + missing
    circo_ids = extra.get("gt_img_ids")
    if isinstance(circo_ids, list):
        named = {str(i) for i in [extra.get("target_img_id"), *circo_ids] if i is not None}
        named.discard(str(extra.get("reference_img_id")))
        count = max(count, len(named))
    return max(count, 1)


def _usable(image: Optional[tuple]) -> bool:
    return bool(image and image[0] and Path(image[0]).is_file())


def _json(text, default):
    if text is None:
        return default
    try:
        return json.loads(text)
    except (TypeError, json.JSONDecodeError):
        return default


_REFERENCE_KEYS = ("reference_image", "reference", "reference_path")
_TARGET_KEYS = ("target_image", "target", "target_hard", "target_path")
_CAPTION_KEYS = ("difference_captions", "captions", "caption", "modification")


def load_file_triplets(path: str | Path, keep_targetless: bool = False, *,
                       source: str = "auto", captions: str = "both") -> TripletSet:
    """Triplets of an exported file: the authors' dataset.json (a list of
    reference_image / target_image / difference_captions) or JSONL with the same or the
    pairs-format keys. Relative image paths are taken from the file's folder. Records
    without a target are kept (target None) only with `keep_targetless`.

    `source` and `captions` pick as for a store where the record says what its captions
    are: `good4cir export --format jsonl` writes the imported captions
    ("original_captions") and each generated caption's kind ("provenance"). A record
    that does not say (dataset.json, a user's own file) offers its captions to any source."""
    _check_options(source, captions)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training file {path} does not exist")
    records = _file_records(path)
    result = TripletSet([], {})
    hashes: dict[str, str] = {}
    keys: dict[str, str] = {}  # an image location as the file writes it -> its key
    unsaid = 0  # records whose captions say neither their source nor their kind

    def key_of(location: str) -> str:
        # Resolving a path stats each of its folders: once per location, not once per
        # record naming it (a reference in many pairs, image-set members).
        if location in keys:
            return keys[location]
        image_path = Path(location)
        if not image_path.is_absolute():
            image_path = path.parent / image_path
        resolved = str(image_path.resolve())
        if resolved not in hashes:
            if not image_path.is_file():
                raise FileNotFoundError(f"image {location} not found")
            hashes[resolved] = hash_file(image_path)
            result.image_paths[hashes[resolved]] = resolved
            result.image_names.setdefault(hashes[resolved], image_path.stem)
        keys[location] = hashes[resolved]
        return hashes[resolved]

    for where, rec in records:
        try:
            if isinstance(rec, Exception):
                raise ValueError(f"not JSON ({rec})")
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
            ref = next((rec[k] for k in _REFERENCE_KEYS if rec.get(k)), None)
            tgt = next((rec[k] for k in _TARGET_KEYS if rec.get(k)), None)
            if not ref or not (tgt or keep_targetless):
                raise ValueError("needs a reference and a target image")
            raw = next((rec[k] for k in _CAPTION_KEYS if rec.get(k)), [])
            texts = [raw] if isinstance(raw, str) else [str(t) for t in raw if str(t).strip()]
            if not texts:
                raise ValueError("has no caption")
            unsaid += not isinstance(rec.get("provenance"), dict)
            texts, kinds = _file_captions(rec, texts, source, captions)
            if not texts:
                raise ValueError(f"no caption for --source {source} --captions {captions}")
            img_set = rec.get("img_set")
            extra = rec.get("extra") or {}
            truths = rec.get("gt_images")
            missing_truths = 0
            if isinstance(truths, list):  # by location: extra's gt_image_ids name another store's ids
                found = []
                for location in dict.fromkeys(t for t in truths if isinstance(t, str)):
                    try:
                        found.append(key_of(location))
                    except FileNotFoundError:  # still a ground truth: mAP counts it, never found
                        missing_truths += 1
                extra = {**extra, "gt_image_ids": found}
            reference, target = key_of(ref), key_of(tgt) if tgt else None
            members = None
            if isinstance(img_set, list):
                members = []
                for location in img_set:
                    try:
                        members.append(key_of(location))
                    except FileNotFoundError:  # as from a store: the pair stays, its set is smaller
                        result.problems.append(f"{where}: image-set member {location} not found "
                                               "(left out of the pair's image set, the pair kept)")
            result.triplets.append(Triplet(
                pair_id=str(rec.get("id") or rec.get("pairid") or where),
                reference=reference, target=target, captions=texts,
                caption_kinds=kinds, split=rec.get("split"),
                source=path.stem,
                img_set=members or None,
                extra=extra,
                ground_truths_named=named_ground_truths(reference, target, extra, missing_truths),
            ))
        except (ValueError, FileNotFoundError, OSError) as exc:
            result.problems.append(f"{where}: {exc}")
    if unsaid and (source in ("original", "generated") or captions != "both"):
        # Not an error: a user's own file of original captions is right under any source.
        log.warning("%s: %d record%s do not say which captions are the dataset's own or generated, "
                    "individual or compound (the authors' dataset.json format), so --source %s --captions %s "
                    "cannot pick among them: all their captions are used; to choose, export with "
                    "good4cir export --format jsonl", path, unsaid, "" if unsaid == 1 else "s", source, captions)
    return result


def _file_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for each record of an exported file: a JSON list (or object of
    them) whole, JSONL line by line as it is read (a 20,000-pair JSONL export with
    provenance is 80 MB; read and parsed whole it took 400 MB more). A line that is not
    JSON is given as its JSONDecodeError."""
    with open(path, encoding="utf-8") as handle:
        head = ""
        while not head:  # the first character that is not white space tells the format
            chunk = handle.read(4096)
            if not chunk:
                return
            head = chunk.lstrip()
        handle.seek(0)
        if head.startswith("[") or (head.startswith("{") and path.suffix == ".json"):
            data = json.loads(handle.read())
            if isinstance(data, dict):
                data = data.get("pairs") or data.get("data") or list(data.values())
            yield from ((f"{path.name}[{i}]", rec) for i, rec in enumerate(data))
            return
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    yield f"{path.name}:{number}", json.loads(line)
                except json.JSONDecodeError as exc:
                    yield f"{path.name}:{number}", exc


def _file_captions(rec: dict, texts: list[str], source: str, captions: str) -> tuple[list[str], list[str]]:
    """A file record's captions for --source / --captions, and their kinds."""
    provenance = rec.get("provenance")
    if not isinstance(provenance, dict):
        return texts, ["original"] * len(texts)
    if provenance.get("captions_from") != "annotation":  # the pair's imported captions
        return _pick_captions(texts, [], source, captions)
    kind_of = {}
    for caption in provenance.get("captions") or []:
        if isinstance(caption, dict):
            text = caption.get("text") or caption.get("original_text") or ""
            kind_of.setdefault(str(text).strip(), caption.get("kind") or "individual")
    original = rec.get("original_captions")
    original = [str(t) for t in original] if isinstance(original, list) else []
    return _pick_captions(original, [(t, kind_of.get(t.strip(), "individual")) for t in texts],
                          source, captions)


def load_triplets(
    dbs: Sequence[str | Path] = (),
    files: Sequence[str | Path] = (),
    *,
    source: str = "auto",
    captions: str = "both",
    include_unreviewed: bool = False,
    keep_targetless: bool = False,
) -> TripletSet:
    """Mix several stores and exported files into one TripletSet."""
    _check_options(source, captions)
    if not dbs and not files:
        raise ValueError("give at least one --db or --data")
    named: dict[Path, str] = {}
    for option, where in [("--db", d) for d in dbs] + [("--data", f) for f in files]:
        # Each of its pairs would train (and be scored) twice, under two ids.
        resolved = Path(where).resolve()
        if resolved in named:
            raise ValueError(f"{where} is named twice ({named[resolved]} and {option} {where}): each of its "
                             "pairs would count twice; name it once")
        named[resolved] = f"{option} {where}"
    merged = TripletSet([], {})
    parts = [(db_path, load_store_triplets(db_path, source=source, captions=captions,
                                           include_unreviewed=include_unreviewed,
                                           keep_targetless=keep_targetless)) for db_path in dbs]
    parts += [(file_path, load_file_triplets(file_path, keep_targetless=keep_targetless,
                                             source=source, captions=captions)) for file_path in files]
    taken: set[str] = set()
    for where, part in parts:
        if len(parts) > 1 and not part.triplets:
            _refuse_empty_part(where, part, source, captions)
        for triplet in part.triplets:
            # Datasets name pairs alike (two demo worlds, pair-000000 in each); eval resamples
            # whole pairs by id, so a repeated id made two pairs one.
            if triplet.pair_id in taken:
                triplet.pair_id = f"{where}:{triplet.pair_id}"
            taken.add(triplet.pair_id)
            triplet.dataset = str(where)
        _merge(merged, part)
    _log_problems(merged.problems)
    return merged


def _refuse_empty_part(where, part: TripletSet, source: str, captions: str) -> None:
    """A dataset named in a mix that gives no pair: the run would go on without it (its
    pairs only lines among the 'left out' ones), reporting the rest as the whole mix."""
    count = len(part.problems)
    first = part.problems[0] if part.problems else ""
    raise ValueError(
        f"{where}: none of its {count} pair{'' if count == 1 else 's'} can be used with --source {source} "
        f"--captions {captions}" + (f" (first: {first})" if first else " (it holds none)")
        + ("; choose another --source or --captions" if "no caption" in first else "; fix that")
        + ", or leave it out of the mix")


_WITHHELD = re.compile(r"^pair .+: no target \(split (.*) withholds it\)$")


def _log_problems(problems: list[str], most: int = 20) -> None:
    """Log what was left out: pairs of a split that withholds its targets (CIRR's test1,
    thousands of them) as one line per split, so they never crowd out the first `most`
    other problems, and a count of the rest."""
    withheld: Counter = Counter()
    others = []
    for problem in problems:
        match = _WITHHELD.match(problem)
        if match:
            withheld[match.group(1)] += 1
        else:
            others.append(problem)
    for split, count in withheld.items():
        log.warning("left out: %d pair%s of split %s: no target (the split withholds it)",
                    count, "" if count == 1 else "s", split)
    for problem in others[:most]:
        log.warning("left out: %s", problem)
    if len(others) > most:
        log.warning("left out: %d more pairs", len(others) - most)


def _merge(into: TripletSet, part: TripletSet) -> None:
    into.triplets.extend(part.triplets)
    into.image_paths.update(part.image_paths)
    into.problems.extend(part.problems)
    for key, name in part.image_names.items():
        into.image_names.setdefault(key, name)


def cross_dataset_leaks(data: TripletSet, train: Sequence[Triplet], val: Sequence[Triplet]) -> list[str]:
    """Warnings for a mix in which one dataset trains on images that another's validation
    or test pairs use (as reference or target): images are one key whatever dataset holds
    them, so nothing kept them apart, and those pairs' scores are of images the model saw.
    Within one dataset its own splits are its makers' choice, and are not checked."""
    trained_in: dict[str, set[str]] = {}  # image key -> datasets that train on it
    for t in train:
        for key in (t.reference, t.target):
            trained_in.setdefault(key, set()).add(t.dataset)
    warnings = []
    for name, held_out, harm in (
            ("validation", val, "validation scores (which pick best.pt) are of images the model trained on"),
            ("test", data.split("test"), "eval on split test scores images the model trained on")):
        leaked: dict[str, list[tuple[Triplet, str, set[str]]]] = {}
        for t in held_out:
            for key in (t.reference, t.target):
                others = trained_in.get(key, set()) - {t.dataset}
                if others:
                    leaked.setdefault(t.dataset, []).append((t, key, others))
                    break
        for dataset, pairs in leaked.items():
            total = sum(1 for t in held_out if t.dataset == dataset)
            _, key, others = pairs[0]
            warnings.append(
                f"{len(pairs)} of the {total} {name} pairs of {dataset} use an image that "
                f"{', '.join(sorted(others))} trains on (first: image "
                f"{data.image_names.get(key) or key[:12]}): {harm}; leave those pairs out of one "
                "dataset, or give them the same split in both")
    return warnings


def train_val_split(data: TripletSet, val_fraction: float = 0.1,
                    seed: int = 0) -> tuple[list[Triplet], list[Triplet]]:
    """The train and validation triplets. Pairs marked train/val are used as marked;
    a dataset without splits gets a seeded random `val_fraction` held out for validation.
    Pairs of a split of another name ("dev", "validation") are held out, and said: such a
    split is one to evaluate on (eval --split NAME), and it was trained on."""
    train = data.split("train")
    val = data.split("val")
    unsplit = [t for t in data.triplets if not t.split]
    others = Counter(t.split for t in data.triplets if t.split and t.split not in ("train", "val", "test"))
    if others:
        log.warning("%s not trained on: train trains on split train and validates on val (pairs with no split "
                    "are divided at random); evaluate them with eval --split NAME, or import them with split "
                    "train or val to train on them",
                    ", ".join(f"{count} pair{'' if count == 1 else 's'} of split {name}"
                              for name, count in sorted(others.items())))
    if unsplit:
        # Said aloud: a file exported with its test pairs (dataset.json has no split) trains
        # on them, and eval on the store's test split then scores pairs the model has seen.
        log.warning("%d pairs are in no train, val or test split (the authors' dataset.json names none): a random %d%% of them "
                    "validates and the rest trains, test pairs too if the data holds any; to keep them out, "
                    "export with --split train, or use the JSONL export, which keeps each pair's split",
                    len(unsplit), round(val_fraction * 100))
        rng = random.Random(seed)
        order = list(unsplit)
        rng.shuffle(order)
        n_val = max(1, int(len(order) * val_fraction)) if len(order) > 1 else 0
        val.extend(order[:n_val])
        train.extend(order[n_val:])
    return train, val
