"""A small world of images and pairs for the pipeline tests and benchmark.

Images are drawn with Pillow (coloured shapes on coloured walls, each one different) and
stored through the store's own connection, as an import would.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from PIL import Image, ImageDraw

from store.db import open_db, transaction, utc_now

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "grey", "pink", "brown"]


def draw_image(path: Path, index: int, size: int = 256) -> None:
    rng = random.Random(index)
    image = Image.new("RGB", (size, size), rng.choice(COLOURS))
    draw = ImageDraw.Draw(image)
    for _ in range(3 + index % 4):
        x, y = rng.randrange(size - 60), rng.randrange(size - 60)
        w, h = rng.randrange(20, 60), rng.randrange(20, 60)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x, y, x + w, y + h], fill=rng.choice(COLOURS), outline="black")
    draw.text((4, 4), f"#{index}", fill="black")
    image.save(path)


def build_world(db_path: Path, image_dir: Path, *, references: int, pairs: int,
                split: str = "train", source: str = "test") -> dict:
    """`references` reference images, `pairs` pairs spread evenly over them, each with
    its own target image. Returns {"pair_ids": [...], "images": {name: (id, path)}}."""
    image_dir.mkdir(parents=True, exist_ok=True)
    db = open_db(db_path)
    now = utc_now()
    images: dict[str, tuple[str, str]] = {}

    def add_image(name: str, index: int) -> str:
        path = image_dir / f"{name}.png"
        draw_image(path, index)
        data = path.read_bytes()
        image_id = hashlib.sha256(data).hexdigest()
        images[name] = (image_id, str(path))
        db.execute(
            "INSERT OR IGNORE INTO images (id, name, path, root, width, height, size_bytes, format,"
            " split, created_at) VALUES (?, ?, ?, ?, 256, 256, ?, 'PNG', ?, ?)",
            [image_id, name, str(path), str(image_dir), len(data), split, now])
        return image_id

    pair_ids = []
    with transaction(db):
        refs = [add_image(f"ref{i:04d}", i) for i in range(references)]
        for j in range(pairs):
            target = add_image(f"tgt{j:04d}", 100_000 + j)
            pair_id = hashlib.sha256(f"{source}/{j}".encode()).hexdigest()[:16]
            db.execute(
                "INSERT INTO pairs (id, source, external_id, reference_id, target_id, split, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [pair_id, source, str(j), refs[j % references], target, split, f"{now}-{j:06d}"])
            pair_ids.append(pair_id)
    db.conn.close()
    return {"pair_ids": pair_ids, "images": images}


def corrupt_image(path: str) -> None:
    """Overwrite an image with a truncated PNG."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 3])


def table_rows(db_path, sql: str, params=()) -> list[tuple]:
    import sqlite3

    conn = sqlite3.connect(str(db_path))
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def store_snapshot(db_path) -> dict:
    """What a run produced, independent of ids and timestamps: for comparing stores."""
    return {
        "annotations": sorted(table_rows(db_path, "SELECT pair_id, status, error, stage1_id, stage2_id FROM annotations")),
        "captions": sorted(table_rows(db_path, "SELECT c.annotation_id, c.kind, c.position, c.text, c.sources,"
                                               " c.token_count FROM captions c")),
        "descriptions": sorted(table_rows(db_path, "SELECT id, stage, image_id, pair_id, objects FROM descriptions")),
        "ok_calls": sorted(table_rows(db_path, "SELECT stage, request_hash, response FROM calls WHERE status = 'ok'")),
    }
