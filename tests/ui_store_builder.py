"""A small annotated store for the UI tests, written through store.annotations the way
the pipeline writes it (images and pairs rows as an importer would store them)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from PIL import Image, ImageDraw

from store.annotations import complete_annotation, create_run, ensure_annotations, save_description
from store.db import open_db, transaction, utc_now

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "grey"]


def _image(path: Path, colour: str, shape: str) -> str:
    img = Image.new("RGB", (256, 256), "beige")
    draw = ImageDraw.Draw(img)
    if shape == "square":
        draw.rectangle([60, 60, 196, 196], fill=colour)
    else:
        draw.ellipse([60, 60, 196, 196], fill=colour)
    img.save(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_review_store(root: Path, n_pairs: int = 6, *, script_caption: bool = False) -> dict:
    """n_pairs annotated pairs (run 1, done, with stage 1/2 descriptors, 4 captions, 2
    compounds, ground truth). Returns {'db_path', 'image_dir', 'annotation_ids', 'run_id'}."""
    root = Path(root)
    image_dir = root / "dataset" / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    db_path = root / "review.db"
    db = open_db(db_path)
    now = utc_now()
    pair_ids = []
    with transaction(db):
        for i in range(n_pairs):
            colour, colour2 = COLOURS[i % len(COLOURS)], COLOURS[(i + 3) % len(COLOURS)]
            ref_path, tgt_path = image_dir / f"ref{i}.png", image_dir / f"tgt{i}.png"
            ref_id = _image(ref_path, colour, "square")
            tgt_id = _image(tgt_path, colour2, "circle")
            for image_id, path in ((ref_id, ref_path), (tgt_id, tgt_path)):
                db.execute(
                    "INSERT OR IGNORE INTO images (id, name, path, root, width, height, format, split,"
                    " scene_json, created_at) VALUES (?, ?, ?, ?, 256, 256, 'PNG', 'val', ?, ?)",
                    [image_id, path.stem, str(path.resolve()), str((root / "dataset").resolve()),
                     json.dumps({"objects": [{"name": "box", "colour": colour}]}), now],
                )
            pair_id = hashlib.sha256(f"demo:p{i}".encode()).hexdigest()[:16]
            db.execute(
                "INSERT INTO pairs (id, source, external_id, reference_id, target_id, split,"
                " original_captions, ground_truth, created_at) VALUES (?, 'demo', ?, ?, ?, ?, ?, ?, ?)",
                [pair_id, f"p{i}", ref_id, tgt_id, "val" if i % 2 else "train",
                 json.dumps([f"make the {colour} box a {colour2} circle"]),
                 json.dumps([{"op": "recolour", "object": "box", "from": colour, "to": colour2}]), now],
            )
            pair_ids.append(pair_id)
    run = create_run(db, "simulator", "sim-1", name="test run")
    ensure_annotations(db, run.id, pair_ids)
    annotation_ids = []
    for i, pair_id in enumerate(pair_ids):
        colour, colour2 = COLOURS[i % len(COLOURS)], COLOURS[(i + 3) % len(COLOURS)]
        ann_id = f"{run.id}:{pair_id}"
        ref_id, tgt_id = db.execute("SELECT reference_id, target_id FROM pairs WHERE id = ?", [pair_id]).fetchone()
        s1 = save_description(db, f"s1-{i}", 1, ref_id, [
            {"name": "box", "descriptors": [f"{colour} colour", "square shape", "large"]},
            {"name": "wall", "descriptors": ["beige", "plain"]},
            {"name": "lamp", "descriptors": ["brass", "tall"]},
        ], model="sim-1")
        s2 = save_description(db, f"s2-{i}", 2, tgt_id, [
            {"name": "box", "descriptors": [f"{colour2} colour", "round shape", "large"]},
            {"name": "wall", "descriptors": ["beige", "plain"]},
            {"name": "plant", "descriptors": ["green leaves", "in a pot"]},
        ], pair_id=pair_id, model="sim-1")
        captions = [
            f"Make the box {colour2} instead of {colour}.",
            "Change the square into a circle.",
            "Remove the tall brass lamp.",
            "Add a potted plant." if not (script_caption and i == 0) else "<script>window.g4cPwned=1</script><img src=x onerror=\"window.g4cPwned=2\">${7*7}",
        ]
        complete_annotation(
            db, ann_id, stage1_id=s1.id, stage2_id=s2.id, captions=captions,
            compounds=[(captions[0][:-1] + " and " + captions[1][0].lower() + captions[1][1:], [0, 1], 20),
                       (captions[2][:-1] + "; also " + captions[3][0].lower() + captions[3][1:], [2, 3], 22)],
        )
        annotation_ids.append(ann_id)
    return {"db_path": db_path, "image_dir": image_dir, "annotation_ids": annotation_ids, "run_id": run.id}


SCRIPT_CAPTION = "<script>window.g4cPwned=1</script><img src=x onerror=\"window.g4cPwned=2\">${7*7}"


def build_demo_store(root: Path, pairs: int = 16, annotate: int = 10, *, index: bool = False) -> dict:
    """A real demo world imported as the product does it, `annotate` pairs annotated by the
    simulator backend through the pipeline runner, the first caption of the last
    annotated pair edited by 'mallory' to hold markup, and optionally a FAISS index from a
    tiny random-init retriever. Returns {'db_path', 'world_dir', 'annotation_ids', 'index_path'}."""
    from pipeline.runner import RunOptions, run_pipeline
    from store.demo_world.world import generate_world
    from store.importers import import_dataset
    from store.review import edit_caption

    root = Path(root)
    world_dir = root / "world"
    generate_world(world_dir, pairs=pairs, seed=0, workers=1, progress=False)
    db_path = root / "demo.db"
    db = open_db(db_path)
    import_dataset(db, "pairs", world_dir)
    run_pipeline(db_path, RunOptions(backend="simulator", limit=annotate, error_rate=0.3, seed=1))
    annotation_ids = [r[0] for r in db.execute(
        "SELECT id FROM annotations WHERE status = 'done' ORDER BY seq").fetchall()]
    edit_caption(db, f"{annotation_ids[-1]}:c0", SCRIPT_CAPTION, "mallory")
    index_path = None
    if index:
        from retrieval.index import build_gallery_index
        from retrieval.model import build_model, save_weights, write_config

        checkpoint = root / "checkpoint"
        checkpoint.mkdir()
        config = {"model": "tiny", "fusion": "residual"}
        write_config(checkpoint, config)
        save_weights(checkpoint / "best.pt", build_model(config))
        index_path = root / "index"
        build_gallery_index(db_path, checkpoint, index_path, num_workers=0, progress=False)
    return {"db_path": db_path, "world_dir": world_dir, "annotation_ids": annotation_ids,
            "index_path": str(index_path) if index_path else None, "db": db}
