"""A tiny synthetic CIR world in a real store, for the retrieval tests.

Rooms are a wall colour with a coloured square at one of three places; a pair changes
the square's colour, or moves it, and says so. Val/test pairs carry a six-image set of
near-duplicates of the target. Rows are written with plain SQL into a store opened by
store.db (schema and migrations are the real ones).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from store.db import open_db, transaction, utc_now

WALLS = {"white": (236, 232, 224), "grey": (150, 150, 150), "navy": (52, 66, 104)}
COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 200),
           "yellow": (230, 200, 40), "black": (20, 20, 20), "pink": (230, 120, 170)}
PLACES = {"left": 8, "centre": 24, "right": 40}


def render(wall: str, colour: str, place: str, directory: Path) -> Path:
    path = directory / f"{wall}-{colour}-{place}.png"
    if not path.exists():
        image = Image.new("RGB", (64, 64), WALLS[wall])
        x = PLACES[place]
        ImageDraw.Draw(image).rectangle([x, 20, x + 16, 44], fill=COLOURS[colour])
        image.save(path)
    return path


def make_world_store(root: Path, pairs: int = 90, seed: int = 0) -> Path:
    """A store at root/world.db with `pairs` pairs (70% train, 15% val, 15% test)."""
    rng = random.Random(seed)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    db_path = root / "world.db"
    db = open_db(db_path)
    now = utc_now()
    image_rows: dict[str, dict] = {}
    pair_rows = []

    def image_id(wall, colour, place, split):
        path = render(wall, colour, place, images_dir)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        image_rows.setdefault(digest, {
            "id": digest, "name": path.name, "path": str(path), "split": split, "created_at": now,
        })
        return digest

    for n in range(pairs):
        split = "train" if n < pairs * 0.7 else "val" if n < pairs * 0.85 else "test"
        wall = rng.choice(list(WALLS))
        colour = rng.choice(list(COLOURS))
        place = rng.choice(list(PLACES))
        if rng.random() < 0.6:
            new_colour = rng.choice([c for c in COLOURS if c != colour])
            target = (wall, new_colour, place)
            captions = [f"make the square {new_colour}", f"change the square to {new_colour}"]
            others = [(wall, c, place) for c in COLOURS if c not in (colour, new_colour)]
        else:
            new_place = rng.choice([p for p in PLACES if p != place])
            target = (wall, colour, new_place)
            captions = [f"move the square to the {new_place}", f"put the square on the {new_place}"]
            others = [(w, colour, new_place) for w in WALLS if w != wall] + [
                (wall, c, new_place) for c in COLOURS if c != colour]
        ref_id = image_id(wall, colour, place, split)
        tgt_id = image_id(*target, split)
        img_set = None
        if split != "train":
            members = rng.sample(others, 4)
            img_set = [ref_id, tgt_id] + [image_id(*m, split) for m in members]
        pair_rows.append({
            "id": f"p{n:04d}", "source": "synthetic", "external_id": str(n),
            "reference_id": ref_id, "target_id": tgt_id, "split": split,
            "original_captions": json.dumps(captions),
            "img_set": json.dumps(img_set) if img_set else None,
            "extra": json.dumps({"heldout": ["phrasing"] if n % 2 else []} if split == "test" else {}),
            "created_at": now,
        })
    with transaction(db):
        db["images"].insert_all(image_rows.values(), pk="id", replace=True)
        db["pairs"].insert_all(pair_rows, pk="id", replace=True)
    db.conn.close()
    return db_path


def test_world_store_is_valid(tmp_path):
    db_path = make_world_store(tmp_path, pairs=20)
    db = open_db(db_path)
    assert db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0] == 20
    for (path,) in db.execute("SELECT path FROM images").fetchall():
        assert Path(path).is_file()
