"""Generate a demo world on disk in the project's "pairs" import format.

    DIR/images/<000123>.png   256 px renders
    DIR/pairs.jsonl           {"id", "reference", "target", "split", "captions", "edits",
                               "img_set", "heldout" (list; test only non-empty)}
    DIR/scenes.jsonl          {"image", "split", "role", "scene"} for every image
    DIR/world.json            seed, counts, vocabulary and the held-out phrasings and combos

The whole world (scenes, edits, captions, names) is planned in one process from the seed;
rendering is a pure function of each scene, so the output is byte-identical whatever the
number of worker processes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .captions import heldout_phrasings, make_captions
from .render import SIZE, render_png
from .scene import (
    Edit,
    Scene,
    edit_for_combo,
    edit_shows_combo,
    near_duplicates,
    random_edits,
    random_scene,
    scene_has_combo,
    scene_key,
)
from .vocab import (
    COLOURS,
    EDIT_OPS,
    FLOORS,
    HELDOUT_COMBOS,
    KINDS,
    PATTERNS,
    POSITIONS,
    SIZES,
    WALL_COLOURS,
    combo_phrase,
)

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
CAPTIONS_PER_PAIR = 4
IMG_SET_NEGATIVES = 4
# Share of test pairs whose captions use only held-out phrasings, and whose edits are
# steered to show a held-out kind x attribute combination.
HELDOUT_PHRASING_SHARE = 0.35
HELDOUT_COMBO_SHARE = 0.35
# Odds of a pair having 1, 2 or 3 edits.
EDIT_COUNT_WEIGHTS = (5, 3, 2)
_IMAGE_NAME = re.compile(r"^\d{6}\.png$")
_IMAGE_TEMP_NAME = re.compile(r"^\d{6}\.png\.tmp$")


@dataclass
class WorldPlan:
    """Everything to write, before rendering: image records, pair records, metadata."""

    images: list[dict[str, Any]] = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def split_sizes(n_pairs: int) -> dict[str, int]:
    """Pairs per split: 80/10/10, with at least one val and one test pair from 3 pairs on."""
    if n_pairs < 3:
        return {"train": n_pairs, "val": 0, "test": 0}
    n_val = max(1, round(0.1 * n_pairs))
    n_test = max(1, round(0.1 * n_pairs))
    return {"train": n_pairs - n_val - n_test, "val": n_val, "test": n_test}


class _Planner:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.plan = WorldPlan()
        self.used_keys: set[str] = set()

    def add_image(self, scene: Scene, split: str, role: str) -> str:
        name = f"images/{len(self.plan.images):06d}.png"
        self.used_keys.add(scene_key(scene))
        self.plan.images.append({"image": name, "split": split, "role": role, "scene": scene})
        return name

    def fresh_scene(self, forbid: tuple) -> Scene:
        while True:
            scene = random_scene(self.rng, forbid)
            if scene_key(scene) not in self.used_keys:
                return scene

    def pair(self, reference: Scene, split: str, forbid: tuple) -> tuple[list[Edit], Scene, list[Scene], bool]:
        """Edits, target, near-duplicate negatives and whether to phrase it with held-out templates.

        Every split gets its image set, as CIRR's train split has one: training needs the
        near-duplicates as negatives to learn that one attribute changes the answer."""
        rng = self.rng
        want_phrasing = split == "test" and rng.random() < HELDOUT_PHRASING_SHARE
        want_combo = split == "test" and rng.random() < HELDOUT_COMBO_SHARE
        ref_key = scene_key(reference)
        for _attempt in range(200):
            n_edits = rng.choices((1, 2, 3), weights=EDIT_COUNT_WEIGHTS)[0]
            first = None
            if want_combo:
                combos = list(HELDOUT_COMBOS)
                rng.shuffle(combos)
                first = next((e for e in (edit_for_combo(rng, reference, c) for c in combos) if e), None)
            edits, target = random_edits(rng, reference, n_edits, forbid, first)
            key = scene_key(target)
            if not edits or key == ref_key or key in self.used_keys:
                continue
            if forbid and scene_has_combo(target, forbid):
                continue
            found = near_duplicates(rng, target, edits, IMG_SET_NEGATIVES, self.used_keys | {ref_key, key}, forbid)
            if len(found) < IMG_SET_NEGATIVES:
                continue
            negatives = [s for s, _change in found]
            return edits, target, negatives, want_phrasing
        raise RuntimeError("could not find a new edit for a reference scene after 200 tries")


def plan_world(n_pairs: int, seed: int) -> WorldPlan:
    """The world's scenes, pairs and metadata, deterministic in (n_pairs, seed)."""
    if n_pairs < 1:
        raise ValueError(f"--pairs must be at least 1, got {n_pairs}")
    planner = _Planner(seed)
    rng = planner.rng
    sizes = split_sizes(n_pairs)
    for split in SPLITS:
        forbid = () if split == "test" else HELDOUT_COMBOS
        remaining = sizes[split]
        while remaining > 0:
            # a reference serves 1-3 pairs, as in CIRR (and so stage 1 is cached across pairs)
            group = min(remaining, rng.choice((1, 2, 2, 3)))
            remaining -= group
            reference = planner.fresh_scene(forbid)
            ref_name = planner.add_image(reference, split, "reference")
            for _ in range(group):
                edits, target, negatives, phrasing = planner.pair(reference, split, forbid)
                target_name = planner.add_image(target, split, "target")
                heldout = []
                if phrasing:
                    heldout.append("phrasing")
                if split == "test" and any(edit_shows_combo(e, HELDOUT_COMBOS) for e in edits):
                    heldout.append("combo")
                record: dict[str, Any] = {
                    "id": f"pair-{len(planner.plan.pairs):06d}",
                    "reference": ref_name,
                    "target": target_name,
                    "split": split,
                    "captions": make_captions(edits, rng, CAPTIONS_PER_PAIR, heldout=phrasing),
                    "edits": edits,
                }
                img_set = [ref_name, target_name] + [planner.add_image(s, split, "negative") for s in negatives]
                rng.shuffle(img_set)
                record["img_set"] = img_set
                record["heldout"] = heldout
                planner.plan.pairs.append(record)
    plan = planner.plan
    plan.meta = {
        "generator": "good4cir demo world",
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "pairs": len(plan.pairs),
        "images": len(plan.images),
        "image_size": SIZE,
        "captions_per_pair": CAPTIONS_PER_PAIR,
        "splits": {
            s: {"pairs": sum(p["split"] == s for p in plan.pairs), "images": sum(i["split"] == s for i in plan.images)}
            for s in SPLITS
        },
        "heldout": {
            "split": "test",
            "phrasings": heldout_phrasings(),
            "combos": [{"kind": k, "attribute": a, "value": v, "phrase": combo_phrase(k, a, v)}
                       for k, a, v in HELDOUT_COMBOS],
            "test_pairs": {
                tag: sum(tag in p["heldout"] for p in plan.pairs) for tag in ("phrasing", "combo")
            },
        },
        "vocabulary": {
            "kinds": list(KINDS), "colours": list(COLOURS), "patterns": list(PATTERNS), "sizes": list(SIZES),
            "positions": list(POSITIONS), "wall_colours": list(WALL_COLOURS), "floors": list(FLOORS),
            "edit_ops": list(EDIT_OPS),
        },
    }
    return plan


def _render_job(job: tuple[str, Scene]) -> str:
    path, scene = job
    data = render_png(scene)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def _leave_ctrl_c_to_the_parent() -> None:
    # A terminal's Ctrl-C reaches every process of the group: each worker printed its own
    # KeyboardInterrupt traceback. The parent stops the pool (SIGTERM) as it unwinds.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def render_images(jobs: list[tuple[str, Scene]], workers: int, progress: bool = True) -> None:
    """Render and write every (path, scene); ``workers`` > 1 uses that many processes."""
    from tqdm import tqdm

    if workers <= 1 or len(jobs) < 64:
        for job in tqdm(jobs, desc="rendering", unit="img", disable=not progress, leave=False):
            _render_job(job)
        return
    # fork starts workers in milliseconds, but forking a multi-threaded process (the
    # review app calls this too) can deadlock; spawn is the safe fallback there
    methods = multiprocessing.get_all_start_methods()
    method = "fork" if "fork" in methods and threading.active_count() == 1 else "spawn"
    ctx = multiprocessing.get_context(method)
    # started before tqdm, whose monitor is a thread
    with ctx.Pool(workers, initializer=_leave_ctrl_c_to_the_parent) as pool:
        with tqdm(total=len(jobs), desc="rendering", unit="img", disable=not progress, leave=False) as bar:
            for _ in pool.imap_unordered(_render_job, jobs, chunksize=16):
                bar.update(1)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n")
    os.replace(tmp, path)


def generate_world(out_dir: str | os.PathLike, pairs: int, seed: int = 0, workers: int | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Write a demo world of ``pairs`` pairs to ``out_dir``; returns world.json's content.

    A folder that holds a pairs.jsonl but no world.json is someone's own data and is
    refused; an earlier demo world there is replaced (its stale images are removed).
    """
    out = Path(out_dir)
    if (out / "pairs.jsonl").exists() and not (out / "world.json").exists():
        raise ValueError(f"{out} holds a pairs.jsonl that is not a demo world; choose another --out")
    plan = plan_world(pairs, seed)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    wanted = {Path(i["image"]).name for i in plan.images}
    for old in images_dir.iterdir():
        # and an image a killed run left half written (_render_job's temporary name)
        if (_IMAGE_NAME.match(old.name) and old.name not in wanted) or _IMAGE_TEMP_NAME.match(old.name):
            old.unlink()
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    jobs = [(str(out / i["image"]), i["scene"]) for i in plan.images]
    render_images(jobs, workers, progress)
    _write_jsonl(out / "scenes.jsonl", plan.images)
    _write_jsonl(out / "pairs.jsonl", plan.pairs)
    tmp = out / "world.json.tmp"
    tmp.write_text(json.dumps(plan.meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "world.json")
    return plan.meta
