"""Small pieces of the pipeline: prompts, parsing, validation, error mapping, prices."""

from __future__ import annotations

import hashlib
import json
from importlib import resources

import pytest

from pipeline.backends.base import PermanentError, TransientError
from pipeline.backends.openai_backend import map_openai_error, parse_retry_after
from pipeline.images import BadImageError, encode_image
from pipeline.pricing import PriceTable
from pipeline.prompts import PROMPT_NAMES, load_prompt, parse_prompt, prompt_versions
from pipeline.schemas import DescriptorList, ModificationCaptions, strict_json_schema
from pipeline.stages import (
    InvalidAnswerError,
    extract_json,
    parse_answer,
    repair_request,
    stage1_request,
    stage3_request,
)


def test_prompt_versions_are_the_hash_of_each_file():
    for name in PROMPT_NAMES:
        text = resources.files("prompts").joinpath(f"{name}.txt").read_text(encoding="utf-8")
        assert load_prompt(name).version == hashlib.sha256(text.encode()).hexdigest()[:12]
    assert len(set(prompt_versions().values())) == len(PROMPT_NAMES)
    edited = parse_prompt("stage1", "[user]\nList the objects.\n")
    assert edited.version != load_prompt("stage1").version


def test_prompt_render_requires_exactly_its_placeholders():
    prompt = load_prompt("stage3")
    assert prompt.placeholders == {"reference_objects", "target_objects"}
    with pytest.raises(ValueError, match="takes"):
        prompt.render(reference_objects="[]")
    system, user = prompt.render(reference_objects="R-LIST", target_objects="T-LIST")
    assert "R-LIST" in user and "T-LIST" in user and '{"captions"' in user


def test_requests_carry_prompt_version_schema_and_image_ids():
    request = stage1_request("img-1", "/x/a.png")
    assert request.prompt_version == load_prompt("stage1").version
    assert request.image_ids == ["img-1"] and request.image_paths == ["/x/a.png"]
    assert request.json_schema == strict_json_schema(DescriptorList)
    request3 = stage3_request("pair-1", [{"name": "lamp", "descriptors": ["red"]}],
                              [{"name": "lamp", "descriptors": ["blue"]}])
    assert request3.image_paths == [] and '"red"' in request3.text and '"blue"' in request3.text
    repair = repair_request(request3, "not json", "the answer is not valid JSON")
    assert [t["role"] for t in repair.history] == ["assistant", "user"]
    assert "the answer is not valid JSON" in repair.history[1]["content"]
    assert json.dumps(request3.json_schema) in repair.history[1]["content"]


@pytest.mark.parametrize("text", [
    '{"captions": ["a", "b", "c"]}',
    'Here you go:\n```json\n{"captions": ["a", "b", "c"]}\n```',
    'The answer is {"captions": ["a", "b", "c"]} as requested.',
])
def test_extract_json_from_plain_fenced_and_chatty_answers(text):
    assert extract_json(text) == {"captions": ["a", "b", "c"]}


def test_parse_answer_reasons():
    with pytest.raises(InvalidAnswerError, match="not valid JSON"):
        parse_answer("stage1", "no json here")
    with pytest.raises(InvalidAnswerError, match="cut off"):
        parse_answer("stage1", '{"objects": [', "length")
    with pytest.raises(InvalidAnswerError, match="at least 3"):
        parse_answer("stage3", '{"captions": ["one", "two"]}')
    with pytest.raises(InvalidAnswerError, match="refers to the images"):
        parse_answer("single", '{"captions": ["Make the lamp red", "In the first image there is a bed", "x"]}')
    with pytest.raises(InvalidAnswerError, match="objects"):
        parse_answer("stage2", '{"objects": []}')
    ok = parse_answer("stage3", '["Make the lamp red", "Add a plant", "Remove the rug"]')
    assert ok.captions[0] == "Make the lamp red"


@pytest.mark.parametrize("caption", ["Image 1 has a red lamp", "unlike image two, add a bed",
                                     "the second picture shows a rug", "In the target image the wall is blue"])
def test_captions_that_name_the_images_are_rejected(caption):
    with pytest.raises(ValueError):
        ModificationCaptions(captions=[caption, "Add a plant", "Remove the rug"])


@pytest.mark.parametrize("caption", ["Hang a picture above the bed", "Make the photo frame gold",
                                     "Add two images of birds to the wall"])
def test_captions_about_pictures_in_the_scene_are_fine(caption):
    ModificationCaptions(captions=[caption, "Add a plant", "Remove the rug"])


def test_a_stage_3_caption_with_line_breaks_is_stored_on_one_line():
    # A caption is one line in exports and for CLIP, as the review app stores edits.
    parsed = parse_answer("stage3", '["Make the lamp\\nred", "Add a\\r\\n  plant", "Remove\\tthe rug"]')
    assert parsed.captions == ["Make the lamp red", "Add a plant", "Remove the rug"]


def test_strict_schema_has_every_property_required_and_no_extras():
    schema = strict_json_schema(ModificationCaptions)
    assert schema["additionalProperties"] is False and schema["required"] == ["captions"]
    text = json.dumps(strict_json_schema(DescriptorList))
    assert "minLength" not in text and '"title"' not in text


def test_retry_after_headers():
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert parse_retry_after({}) is None


def test_openai_errors_map_to_transient_or_permanent_and_hide_the_key():
    import httpx2
    import openai

    request = httpx2.Request("POST", "http://x/v1/chat/completions")

    def status_error(cls, code, headers=None, message="boom"):
        response = httpx2.Response(code, headers=headers or {}, request=request)
        return cls(message, response=response, body=None)

    limited = map_openai_error(status_error(openai.RateLimitError, 429, {"retry-after": "3"}))
    assert isinstance(limited, TransientError) and limited.retry_after == 3.0
    assert isinstance(map_openai_error(status_error(openai.InternalServerError, 503)), TransientError)
    assert isinstance(map_openai_error(openai.APITimeoutError(request=request)), TransientError)
    assert isinstance(map_openai_error(openai.APIConnectionError(request=request)), TransientError)
    bad = map_openai_error(status_error(openai.BadRequestError, 400))
    assert isinstance(bad, PermanentError)
    secret = "sk-live-abcdefghijklmnop"
    auth = map_openai_error(status_error(openai.AuthenticationError, 401,
                                         message=f"Incorrect API key provided: {secret}"), secret)
    assert isinstance(auth, PermanentError) and secret not in str(auth) and "***" in str(auth)


def test_prices_per_model_with_override_file(tmp_path):
    table = PriceTable()
    assert table.cost("gpt-4o", 1_000_000, 0) == pytest.approx(2.5)
    assert table.cost("gpt-4o-2024-08-06", 0, 1_000_000) == pytest.approx(10.0)
    assert table.cost("gpt-4o", 1_000_000, 0, batch=True) == pytest.approx(1.25)
    assert table.cost("my-local-llava", 1000, 1000) == 0.0 and table.unknown == {"my-local-llava"}
    override = tmp_path / "prices.json"
    override.write_text(json.dumps({"my-local-llava": {"input": 1.0, "output": 2.0}}))
    table = PriceTable.load(override)
    assert table.cost("my-local-llava", 1_000_000, 1_000_000) == pytest.approx(3.0)
    override.write_text("[1, 2]")
    with pytest.raises(ValueError, match="price file"):
        PriceTable.load(override)


def test_bad_image_files_raise_bad_image_error_naming_the_file(tmp_path):
    from PIL import Image

    good = tmp_path / "good.png"
    Image.new("RGBA", (300, 150), (255, 0, 0, 128)).save(good)
    url = encode_image(good, 100)
    assert url.startswith("data:image/jpeg;base64,")
    truncated = tmp_path / "broken.png"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(BadImageError, match="broken.png"):
        encode_image(truncated, 100)
    with pytest.raises(BadImageError, match="not found"):
        encode_image(tmp_path / "missing.png", 100)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(BadImageError, match="notes.png"):
        encode_image(text, 100)


def test_priority_slots_serve_later_stages_first_and_survive_cancellation():
    import asyncio

    from pipeline.slots import PrioritySlots

    async def scenario():
        slots = PrioritySlots(1)
        order = []
        release = asyncio.Event()

        async def holder():
            async with slots.slot(2):
                await release.wait()

        async def user(name, priority):
            async with slots.slot(priority):
                order.append(name)

        first = asyncio.create_task(holder())
        await asyncio.sleep(0)
        tasks = [asyncio.create_task(user(n, p)) for n, p in [("s1", 2), ("s2", 1), ("s3", 0)]]
        doomed = asyncio.create_task(user("cancelled", 0))
        await asyncio.sleep(0)
        doomed.cancel()
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(first, *tasks)
        assert order == ["s3", "s2", "s1"]
        async with slots.slot(5):  # every slot came back
            pass
        assert slots._free == 1 and not slots._waiters

    asyncio.run(scenario())


def test_a_failed_store_write_stops_later_writes_and_is_reported(tmp_path):
    import asyncio

    from pipeline.store_worker import StoreWorker, StoreWriteError

    async def scenario():
        worker = StoreWorker(str(tmp_path / "s.db"), asyncio.get_running_loop())
        worker.later(lambda db: db.execute("CREATE TABLE t (x INTEGER NOT NULL)"))
        worker.later(lambda db: db.execute("INSERT INTO t VALUES (NULL)"))  # fails
        worker.later(lambda db: db.execute("INSERT INTO t VALUES (1)"))     # must not run
        with pytest.raises(StoreWriteError):
            await worker.call(lambda db: db.execute("SELECT COUNT(*) FROM t").fetchone()[0])
        assert worker.error is not None
        with pytest.raises(StoreWriteError):
            worker.later(lambda db: None)
        worker.close()

    asyncio.run(scenario())
    import sqlite3

    assert sqlite3.connect(tmp_path / "s.db").execute("SELECT COUNT(*) FROM t").fetchone() == (0,)
