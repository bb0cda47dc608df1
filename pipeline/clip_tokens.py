"""Counting CLIP text tokens without importing torch.

Stage 4 and the review app's caption check only need to know how many tokens CLIP's
text encoder would see. open_clip's tokenizer module imports torch, about 4 s on the
dev machine, which a reviewer paid on the first caption save after every app start.
This is the same byte-level BPE over open_clip's own vocabulary file (found on disk,
without importing the package), with the same text cleaning, and gives the same counts
(tests/test_compound.py checks it against open_clip's tokenizer); loading the merges
takes a fraction of a second.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
from functools import lru_cache
from pathlib import Path

import ftfy
import regex

START, END = "<start_of_text>", "<end_of_text>"
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP's vocabulary is 49,408 entries: 512 byte symbols (bare and word-final), the merges
# below, and the two special tokens; the file holds more merges than that.
MERGES = 49408 - 512 - 2
_WORDS = regex.compile(
    rf"{START}|{END}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+", regex.IGNORECASE)


def _byte_symbols() -> dict[int, str]:
    """Each byte as a printable character, as GPT-2 and CLIP's BPE spell them: printable
    bytes stand for themselves, the others for characters from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return symbols


def vocab_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip is not installed: it ships CLIP's BPE vocabulary")
    return Path(next(iter(spec.submodule_search_locations))) / VOCAB_FILE


def clean(text: str) -> str:
    """open_clip's default cleaning: mojibake fixed, HTML entities undone, whitespace
    collapsed, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class ClipTokenCounter:
    def __init__(self, path: Path | None = None):
        lines = gzip.open(path or vocab_path()).read().decode("utf-8").split("\n")[1:MERGES + 1]
        self.ranks = {tuple(line.split()): i for i, line in enumerate(lines)}
        self.symbols = _byte_symbols()
        self._pieces = lru_cache(maxsize=65536)(self._bpe)

    def _bpe(self, word: str) -> int:
        """How many pieces BPE splits one pre-split word (as byte symbols) into."""
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            ranked = [(self.ranks.get(pair, len(self.ranks)), i)
                      for i, pair in enumerate(zip(parts, parts[1:]))]
            best, at = min(ranked)
            if best == len(self.ranks):
                break
            first, second = parts[at], parts[at + 1]
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return len(parts)

    def count(self, text: str) -> int:
        """Tokens CLIP's text encoder sees for `text`, its start and end tokens included."""
        total = 2
        for word in _WORDS.findall(clean(text)):
            if word in (START, END):
                total += 1
                continue
            total += self._pieces("".join(self.symbols[b] for b in word.encode("utf-8")))
        return total


@lru_cache(maxsize=1)
def counter() -> ClipTokenCounter:
    return ClipTokenCounter()
