"""Image validation and decoding: awkward but valid files read correctly, bad files are
refused with a clear per-item reason while the rest of an import goes on."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from store import ImageError, open_db
from store.images import MAX_PIXELS, inspect_image, load_image_rgb
from store.importers import import_dataset


def write_png_bomb(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG of width x height that is tiny on disk (all zero rows)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data)
                     + chunk(b"IEND", b""))
    return path


def awkward_images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    # CMYK JPEG of pure red.
    paths["cmyk"] = folder / "cmyk.jpg"
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(paths["cmyk"], "JPEG", quality=95)
    # 16-bit greyscale PNG: left column black, right column white, middle mid-grey.
    ramp = np.zeros((10, 21), dtype=np.uint16)
    ramp[:, 10] = 32896  # 128 * 257
    ramp[:, 20] = 65535
    paths["16bit"] = folder / "deep.png"
    Image.fromarray(ramp).save(paths["16bit"])
    # Palette image: index 1 is green.
    palette = Image.new("P", (20, 10), 1)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * (254 * 3))
    paths["palette"] = folder / "palette.png"
    palette.save(paths["palette"])
    # Palette with a transparent index 0 on the left half.
    transparent = Image.new("P", (20, 10), 1)
    transparent.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    transparent.paste(0, (0, 0, 10, 10))
    paths["palette_alpha"] = folder / "palette_alpha.png"
    transparent.save(paths["palette_alpha"], transparency=0)
    # RGBA: left half fully transparent red, right half opaque blue.
    rgba = Image.new("RGBA", (20, 10), (0, 0, 255, 255))
    rgba.paste((255, 0, 0, 0), (0, 0, 10, 10))
    paths["alpha"] = folder / "alpha.png"
    rgba.save(paths["alpha"])
    # Stored 40 wide x 20 high, EXIF orientation 6: shown rotated 90 degrees clockwise,
    # i.e. 20 wide x 40 high with the stored left half (red) on top.
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    paths["exif"] = folder / "rotated.jpg"
    stored.save(paths["exif"], "JPEG", exif=exif.tobytes(), quality=95)
    # Unicode file name.
    paths["unicode"] = folder / "chambre_été_日本.png"
    Image.new("RGB", (7, 5), (10, 20, 30)).save(paths["unicode"])
    return paths


def close(pixel, expected, tolerance=12) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, expected))


def test_awkward_valid_images_have_displayed_sizes_and_decode_to_rgb(tmp_path):
    paths = awkward_images(tmp_path)
    sizes = {name: (inspect_image(p).width, inspect_image(p).height) for name, p in paths.items()}
    assert sizes == {"cmyk": (20, 10), "16bit": (21, 10), "palette": (20, 10),
                     "palette_alpha": (20, 10), "alpha": (20, 10), "exif": (20, 40),
                     "unicode": (7, 5)}
    for name, path in paths.items():
        image = load_image_rgb(path)
        assert image.mode == "RGB", name
        assert image.size == sizes[name], name

    assert close(load_image_rgb(paths["cmyk"]).getpixel((5, 5)), (255, 0, 0), 30)
    deep = load_image_rgb(paths["16bit"])
    assert deep.getpixel((0, 0)) == (0, 0, 0)
    assert close(deep.getpixel((10, 0)), (128, 128, 128), 1)  # scaled, not clipped to 255
    assert deep.getpixel((20, 0)) == (255, 255, 255)
    assert load_image_rgb(paths["palette"]).getpixel((3, 3)) == (0, 200, 0)
    see_through = load_image_rgb(paths["palette_alpha"])
    assert see_through.getpixel((2, 2)) == (255, 255, 255)  # transparent -> background
    assert see_through.getpixel((15, 2)) == (0, 0, 255)
    alpha = load_image_rgb(paths["alpha"])
    assert alpha.getpixel((2, 2)) == (255, 255, 255)
    assert alpha.getpixel((15, 2)) == (0, 0, 255)
    upright = load_image_rgb(paths["exif"])
    assert close(upright.getpixel((10, 5)), (255, 0, 0), 40)   # top: the stored left half
    assert close(upright.getpixel((10, 35)), (0, 0, 255), 40)
    assert load_image_rgb(paths["unicode"]).getpixel((0, 0)) == (10, 20, 30)
    info = inspect_image(paths["cmyk"])
    assert info.format == "JPEG" and len(info.id) == 64 and info.size_bytes == paths["cmyk"].stat().st_size


def bad_images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"missing": folder / "missing.png"}
    paths["empty"] = folder / "empty.png"
    paths["empty"].write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    whole = folder / "whole.png"
    Image.fromarray(noise).save(whole)
    paths["truncated"] = folder / "truncated.png"
    paths["truncated"].write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()
    paths["not_image"] = folder / "notes.png"
    paths["not_image"].write_text("these are my notes, not a picture\n")
    paths["bomb"] = write_png_bomb(folder / "bomb.png", 20000, 20000)
    paths["big"] = write_png_bomb(folder / "big.png", 8000, 8000)  # under PIL's limit, over ours
    return paths


EXPECTED_REASONS = {
    "missing": "file not found", "empty": "0 bytes", "truncated": "truncated",
    "not_image": "not an image", "bomb": "too many pixels", "big": "pixels, more than the limit",
}


def test_bad_images_are_refused_with_the_reason(tmp_path):
    assert 8000 * 8000 > MAX_PIXELS
    for name, path in bad_images(tmp_path).items():
        with pytest.raises(ImageError) as caught:
            inspect_image(path)
        assert EXPECTED_REASONS[name] in str(caught.value), (name, str(caught.value))
        assert path.name in str(caught.value)
        if name != "missing":
            with pytest.raises(ImageError):
                load_image_rgb(path)


def test_import_reports_each_bad_item_and_imports_the_rest(tmp_path):
    folder = tmp_path / "mixed"
    bad = bad_images(folder / "images")
    good = awkward_images(folder / "images")
    lines = []
    for name, path in good.items():
        # a pair's reference and target must differ (the import refuses one image twice)
        target = good["cmyk" if name == "unicode" else "unicode"]
        lines.append({"id": f"good-{name}", "reference": f"images/{path.name}",
                      "target": f"images/{target.name}", "captions": [name]})
    for name, path in bad.items():
        lines.append({"id": f"bad-{name}", "reference": f"images/{good['cmyk'].name}",
                      "target": f"images/{path.name}"})
    (folder / "pairs.jsonl").write_text(
        "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    db = open_db(tmp_path / "store.db")
    report = import_dataset(db, "pairs", folder, split="train")
    assert report.pairs_added == len(good)
    reasons = {p.item.split("'")[1]: p.reason for p in report.problems}
    assert set(reasons) == {f"bad-{name}" for name in bad}
    for name in bad:
        assert EXPECTED_REASONS[name] in reasons[f"bad-{name}"]
    rows = dict(db.execute("SELECT name, width || 'x' || height FROM images").fetchall())
    assert rows["images/rotated.jpg"] == "20x40"
    assert rows[f"images/{good['unicode'].name}"] == "7x5"
    assert db.execute("SELECT COUNT(*) FROM pairs WHERE split = 'train'").fetchone()[0] == len(good)
    # No row for any bad file, and nothing new on a second run.
    assert db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == len(good)
    again = import_dataset(db, "pairs", folder, split="train")
    assert (again.pairs_added, again.images_added, again.pairs_skipped) == (0, 0, len(good))
    assert len(again.problems) == len(bad)


def test_the_review_app_shows_every_format_the_import_accepts_with_its_real_media_type(tmp_path):
    # The import accepted AVIF and TIFF (PIL reads them) but the app refused both ('does
    # not have an image file extension'), so such a dataset showed no pictures; and a PNG
    # named .jpg was sent as image/jpeg, from its name; a JPEG saved as .jfif (as browsers
    # on Windows save them) or a file with no extension was refused too.
    import io
    import urllib.request

    from ui.security import resolve_image
    from ui.server import AppServer

    folder = tmp_path / "mine"
    folder.mkdir()
    rng = np.random.default_rng(3)
    pictures = {}
    for name, fmt in [("a.avif", "AVIF"), ("scan.tif", "TIFF"), ("photo.jpg", "PNG"), ("b.png", "PNG"),
                      ("saved.jfif", "JPEG"), ("3f2a9c", "PNG")]:
        pictures[name] = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
        pictures[name].save(folder / name, format=fmt)
    (folder / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in [
        {"id": "1", "reference": "a.avif", "target": "scan.tif"},
        {"id": "2", "reference": "photo.jpg", "target": "b.png"},
        {"id": "3", "reference": "saved.jfif", "target": "3f2a9c"}]))
    db_path = tmp_path / "s.db"
    db = open_db(db_path)
    assert import_dataset(db, "pairs", folder).pairs_added == 3
    ids = dict(db.execute("SELECT name, id FROM images").fetchall())
    assert resolve_image(db, ids["a.avif"]).media_type == "image/avif"
    assert resolve_image(db, ids["photo.jpg"]).media_type == "image/png"
    with AppServer(db_path) as server:
        for name, media_type in [("scan.tif", "image/png"), ("photo.jpg", "image/png"), ("a.avif", "image/avif"),
                                 ("saved.jfif", "image/jpeg"), ("3f2a9c", "image/png")]:
            with urllib.request.urlopen(f"{server.url}g4c/image/{ids[name]}", timeout=10) as response:
                assert response.headers["Content-Type"] == media_type, name
                shown = Image.open(io.BytesIO(response.read())).convert("RGB")
            if name not in ("a.avif", "saved.jfif"):  # lossless: the very pixels
                assert np.array_equal(np.asarray(shown), np.asarray(pictures[name])), name


def test_the_vlm_is_sent_a_16_bit_png_as_the_review_app_and_retrieval_see_it(tmp_path):
    # The pipeline converted with PIL's own convert, which clips 16-bit samples to 255:
    # a 16-bit PNG (scanners, microscopes, renders) went out nearly white, and the VLM
    # was paid to describe a blank picture.
    import base64
    import io

    from pipeline.images import encode_image

    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I;16")
    url = encode_image(path, 512)
    sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("L"), dtype=float)
    shown = np.asarray(load_image_rgb(path).convert("L"), dtype=float)
    assert np.abs(sent - shown).mean() < 3, np.abs(sent - shown).mean()


def test_a_heic_svg_or_pdf_file_is_refused_saying_what_it_is_and_what_to_do(tmp_path):
    # 'not an image file PIL can read' puzzled the owner of an iPhone photo that every
    # viewer shows; the file's kind, by its name, says why and what to do.
    files = {"IMG_0001.HEIC": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64),
             "plan.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
             "page.pdf": b"%PDF-1.4\n%%EOF\n", "notes.png": b"hello"}
    reasons = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageError) as caught:
            inspect_image(tmp_path / name)
        reasons[name] = str(caught.value)
    assert "HEIC/HEIF photo" in reasons["IMG_0001.HEIC"] and "convert it to JPEG" in reasons["IMG_0001.HEIC"]
    assert "SVG drawing" in reasons["plan.svg"] and "PDF document" in reasons["page.pdf"]
    assert reasons["notes.png"].endswith("notes.png: not an image file PIL can read")


def test_an_animated_gif_imports_with_a_note_that_only_its_first_frame_is_used(tmp_path):
    # The VLM and retrieval decode the first frame; the review app shows the animation, so
    # a reviewer judged captions of one frame against a moving picture, unwarned.
    folder = tmp_path / "anim"
    folder.mkdir()
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "green", "blue")]
    frames[0].save(folder / "moving.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[1].save(folder / "still.gif")
    frames[2].save(folder / "still.png")
    (folder / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in [
        {"id": "1", "reference": "moving.gif", "target": "still.png"},
        {"id": "2", "reference": "still.gif", "target": "still.png"}]))
    db = open_db(tmp_path / "s.db")
    report = import_dataset(db, "pairs", folder)
    assert (report.pairs_added, report.problems) == (2, [])
    (note,) = report.warnings
    assert note.item == "moving.gif" and "1 animated image" in note.reason and "first frame" in note.reason
    assert inspect_image(folder / "moving.gif").frames == 3 and inspect_image(folder / "still.gif").frames == 1
    assert import_dataset(db, "pairs", folder).warnings == []  # a rerun adds nothing, says nothing
