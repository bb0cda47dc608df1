"""The stages as data: build each stage's VLMRequest, and turn an answer into a
validated result (or an InvalidAnswerError whose message the repair prompt quotes).

Stage 1: reference image → objects with descriptors. Stage 2: target image + stage 1's
objects → objects (unchanged ones copied word for word). Stage 3: both lists → 3-8
modification captions (text only). `single`: both images → captions in one call, the
ablation baseline. Stage 4 lives in pipeline.compound.

An answer can validate and still be wrong in a way we can see: a caption CLIP would
truncate, a stage 2 object that is a stage 1 object under another name. Those are
AnswerProblems: the runner sends one repair request for them, as for an invalid answer,
and stores what is still wrong afterwards flagged with the problem's reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

from pydantic import BaseModel, ValidationError

from store.models import PIPELINE_FLAG_REASONS

from .backends.base import VLMRequest
from .compound import CLIP_CONTEXT_LENGTH, count_clip_tokens
from .prompts import load_prompt
from .schemas import DescriptorList, ModificationCaptions, strict_json_schema

SCHEMAS: dict[str, type[BaseModel]] = {
    "descriptor_list": DescriptorList,
    "modification_captions": ModificationCaptions,
}
STAGE_SCHEMA = {"stage1": "descriptor_list", "stage2": "descriptor_list",
                "stage3": "modification_captions", "single": "modification_captions"}
_JSON_SCHEMAS = {name: strict_json_schema(model) for name, model in SCHEMAS.items()}


class InvalidAnswerError(Exception):
    """An answer that does not parse or validate; the message says why, briefly."""


def _objects_text(objects: list[dict]) -> str:
    return json.dumps({"objects": objects}, ensure_ascii=False, indent=1)


def _request(stage: str, subject_id: str, values: dict[str, str], *, image_paths=(), image_ids=(),
             temperature: float, max_tokens: int) -> VLMRequest:
    prompt = load_prompt(stage)
    system, user = prompt.render(**values)
    schema_name = STAGE_SCHEMA[stage]
    return VLMRequest(
        stage=stage, system=system, text=user, image_paths=list(image_paths),
        image_ids=list(image_ids), subject_id=subject_id, prompt_version=prompt.version,
        schema_name=schema_name, json_schema=_JSON_SCHEMAS[schema_name],
        temperature=temperature, max_tokens=max_tokens,
    )


def stage1_request(image_id: str, image_path: str, *, temperature: float = 0.2,
                   max_tokens: int = 1500) -> VLMRequest:
    return _request("stage1", image_id, {}, image_paths=[image_path], image_ids=[image_id],
                    temperature=temperature, max_tokens=max_tokens)


def stage2_request(pair_id: str, target_id: str, target_path: str, reference_objects: list[dict],
                   *, temperature: float = 0.2, max_tokens: int = 1500) -> VLMRequest:
    return _request("stage2", pair_id, {"reference_objects": _objects_text(reference_objects)},
                    image_paths=[target_path], image_ids=[target_id],
                    temperature=temperature, max_tokens=max_tokens)


def stage3_request(pair_id: str, reference_objects: list[dict], target_objects: list[dict], *,
                   temperature: float = 0.2, max_tokens: int = 1500) -> VLMRequest:
    return _request("stage3", pair_id, {"reference_objects": _objects_text(reference_objects),
                                        "target_objects": _objects_text(target_objects)},
                    temperature=temperature, max_tokens=max_tokens)


def single_request(pair_id: str, reference: tuple[str, str], target: tuple[str, str], *,
                   temperature: float = 0.2, max_tokens: int = 1500) -> VLMRequest:
    """reference and target: (image id, path)."""
    return _request("single", pair_id, {}, image_paths=[reference[1], target[1]],
                    image_ids=[reference[0], target[0]],
                    temperature=temperature, max_tokens=max_tokens)


def repair_request(request: VLMRequest, bad_answer: str, error: str) -> VLMRequest:
    """The same request plus the bad answer and a turn quoting what was wrong with it."""
    system, user = load_prompt("repair").render(
        error=error, schema=json.dumps(request.json_schema, ensure_ascii=False))
    history = [*request.history, {"role": "assistant", "content": bad_answer or "(empty answer)"},
               {"role": "user", "content": user}]
    return request.model_copy(update={"history": history})


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)
# A reasoning model served without a reasoning parser writes its thinking into the answer
# first, drafts of the JSON included.
_THINKING = re.compile(r"<(think|thinking|reasoning)>.*?</\1>", re.DOTALL | re.IGNORECASE)


def extract_json(text: str) -> Any:
    """The JSON value in an answer: the whole text, a ```json fence, or the first
    balanced {...} in it (for servers that answer in prose around the JSON), after any
    <think>...</think> block (unless nothing else is there)."""
    stripped = _THINKING.sub("", text).strip() or text.strip()
    try:
        return json.loads(stripped)
    except ValueError:
        pass
    for block in _FENCE.findall(stripped):
        try:
            return json.loads(block.strip())
        except ValueError:
            continue
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", stripped):
        try:
            value, _ = decoder.raw_decode(stripped, match.start())
            return value
        except ValueError:
            continue
    raise InvalidAnswerError("the answer is not valid JSON")


def _describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "answer"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def parse_answer(stage: str, text: str, finish_reason: Optional[str] = "stop"
                 ) -> Union[DescriptorList, ModificationCaptions]:
    """Validate an answer for `stage`; raise InvalidAnswerError with a short reason."""
    if finish_reason == "length":
        raise InvalidAnswerError("the answer was cut off (finish_reason 'length'); answer more briefly")
    if not text or not text.strip():
        raise InvalidAnswerError("the answer is empty")
    value = extract_json(text)
    if isinstance(value, list) and stage in ("stage3", "single"):
        value = {"captions": value}  # a bare list of captions is a common slip
    model = SCHEMAS[STAGE_SCHEMA[stage]]
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise InvalidAnswerError(_describe_validation_error(exc)) from None


# ---------------------------------------------------------------- valid but wrong

OVERLONG_CAPTION, RENAMED_OBJECT = PIPELINE_FLAG_REASONS


@dataclass(frozen=True)
class AnswerProblem:
    """What is wrong with a valid answer: `index` is the caption's (stage 3, single) or the
    object's (stage 2) position in it, `reason` the flag it gets if it stays, `detail`
    what the repair request tells the model."""

    index: int
    reason: str
    detail: str


def describe_problems(problems: list[AnswerProblem]) -> str:
    return "; ".join(p.detail for p in problems)


def overlong_captions(captions: list[str], max_tokens: int = CLIP_CONTEXT_LENGTH) -> list[AnswerProblem]:
    """Captions over CLIP's context (start and end tokens counted, as stage 4 counts):
    training would cut off what comes after the last token that fits, silently.
    Loads CLIP's BPE vocabulary on first use (`clip_tokens`: a fraction of a second)."""
    problems = []
    for i, caption in enumerate(captions):
        tokens = count_clip_tokens(caption)
        if tokens > max_tokens:
            problems.append(AnswerProblem(i, OVERLONG_CAPTION, (
                f"caption {i + 1} is too long: {tokens} CLIP tokens where at most {max_tokens} fit "
                "(start and end tokens counted); state the same change in fewer words")))
    return problems


def _name_key(name: str) -> str:
    """An object name as stage 2 must repeat it: case, spacing and a plural aside
    ('Lamps' is the reference's 'lamp' after a count change)."""
    words = re.findall(r"[a-z0-9]+", name.lower())
    if words and len(words[-1]) > 3 and words[-1].endswith("s") and not words[-1].endswith("ss"):
        words[-1] = words[-1][:-1]
    return " ".join(words)


def _descriptor_key(descriptor: str) -> str:
    return re.sub(r"\s+", " ", descriptor).strip().rstrip(" .;,").lower()


def renamed_objects(reference: list[dict], target: list[dict]) -> list[AnswerProblem]:
    """Stage 2 objects that are a stage 1 object under another name ('lamp' -> 'light'):
    a name no stage 1 object has, while a stage 1 object whose name stage 2 lacks shares
    its descriptors (at least 2 and three quarters of the shorter list, or 1 and a word of
    the name). Stage 2 is told to copy names; a new name breaks the alignment stage 3 and
    scoring rely on. A target may really add and remove objects: those have descriptors of
    their own, so they are not counted here. Where and how many are descriptors that
    unrelated objects often share: half of the shorter list flagged a rug removed from the
    centre and a clock added there ("in the centre", "one") as a rename, on 9 of 60
    demo-world pairs with the simulator at error rate 0, each a paid repair request."""
    target_names = {_name_key(o["name"]) for o in target}
    reference_names = {_name_key(o["name"]) for o in reference}
    missing = [o for o in reference if _name_key(o["name"]) not in target_names]
    problems, taken = [], set()
    for i, obj in enumerate(target):
        if _name_key(obj["name"]) in reference_names:
            continue
        mine = {_descriptor_key(d) for d in obj["descriptors"]}
        best, best_shared = None, 0
        for j, old in enumerate(missing):
            theirs = {_descriptor_key(d) for d in old["descriptors"]}
            shared = len(mine & theirs)
            same_word = bool(set(_name_key(obj["name"]).split()) & set(_name_key(old["name"]).split()))
            alike = (shared >= 2 and shared * 4 >= 3 * min(len(mine), len(theirs))) or (shared >= 1 and same_word)
            if alike and j not in taken and shared > best_shared:
                best, best_shared = j, shared
        if best is None:
            continue
        taken.add(best)
        old_name = missing[best]["name"]
        problems.append(AnswerProblem(i, RENAMED_OBJECT, (
            f"object {i + 1} {obj['name']!r} is the reference's {old_name!r} under another name "
            f"({best_shared} of its descriptors are the same); name it {old_name!r} as the reference does")))
    return problems
