"""Prompt templates, loaded from the `prompts` package and versioned by content hash.

A template file has a `[system]` section (optional) and a `[user]` section. Placeholders
are `{name}` and are filled by plain replacement, so the JSON examples in the text need
no escaping. A prompt's version is the first 12 hex digits of the sha256 of the file's
text: edit the file and every output made with it is told apart from the old ones.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

PROMPT_NAMES = ("stage1", "stage2", "stage3", "single", "repair")
_SECTION = re.compile(r"^\[(system|user)\]\s*$", re.MULTILINE)
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


@dataclass(frozen=True)
class Prompt:
    name: str
    version: str
    system: str
    user: str

    @property
    def placeholders(self) -> set[str]:
        return set(_PLACEHOLDER.findall(self.system + self.user))

    def render(self, **values: str) -> tuple[str, str]:
        """(system, user) with every placeholder filled; a missing or unknown value is an error."""
        wanted = self.placeholders
        if set(values) != wanted:
            raise ValueError(
                f"prompt {self.name!r} takes {sorted(wanted)}, got {sorted(values)}"
            )
        system, user = self.system, self.user
        for key, value in values.items():
            system = system.replace("{" + key + "}", value)
            user = user.replace("{" + key + "}", value)
        return system, user


def prompt_version(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def parse_prompt(name: str, text: str) -> Prompt:
    sections: dict[str, str] = {}
    matches = list(_SECTION.finditer(text))
    if not matches:
        raise ValueError(f"prompt {name!r} has no [user] section")
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        sections[match.group(1)] = text[match.end():end].strip()
    if "user" not in sections:
        raise ValueError(f"prompt {name!r} has no [user] section")
    return Prompt(name=name, version=prompt_version(text), system=sections.get("system", ""),
                  user=sections["user"])


@lru_cache(maxsize=None)
def load_prompt(name: str) -> Prompt:
    """The prompt `name` (one of PROMPT_NAMES) from prompts/<name>.txt."""
    if name not in PROMPT_NAMES:
        raise ValueError(f"unknown prompt {name!r}; known: {', '.join(PROMPT_NAMES)}")
    text = resources.files("prompts").joinpath(f"{name}.txt").read_text(encoding="utf-8")
    return parse_prompt(name, text)


def prompt_versions() -> dict[str, str]:
    """{prompt name: version} for every prompt, as stored with a run."""
    return {name: load_prompt(name).version for name in PROMPT_NAMES}
