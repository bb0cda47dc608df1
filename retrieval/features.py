"""Disk caches that make training cheap: decoded pixels and frozen-encoder features.

- `PixelCache`: every image decoded once (EXIF, CMYK, 16-bit handled by the store's
  loader), resized and cropped by the model's own preprocessing, kept as uint8. Keyed
  by the image's content hash and the preprocessing, so any run at that size reuses it.
- `FeatureCache`: frozen-encoder outputs (pooled embedding + tokens) for images and
  captions, keyed by a fingerprint of the encoder weights and the image hash / text hash.

Both are append-only folders of shard files: a run adds one shard with what was
missing, so an interrupted run keeps what it finished and two runs never rewrite a file.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from store.images import load_image_rgb


def default_cache_dir() -> Path:
    root = os.environ.get("GOOD4CIR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "good4cir"
    )
    return Path(root)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _load_shard(path: Path, mmap: bool) -> dict:
    if mmap:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a file torch cannot map (an old format): read it whole
            pass
    return torch.load(str(path), map_location="cpu", weights_only=True)


class _Shards:
    """A folder of torch files, each {'keys': [...], 'data': {name: tensor (N, ...)}}."""

    def __init__(self, directory: Path):
        self.directory = directory

    def read(self, mmap: bool = False) -> tuple[list[str], dict[str, list[torch.Tensor]]]:
        """Every shard's keys and tensors. With `mmap` the tensors are mapped from their
        files, so only the rows a caller then copies out are read from disk."""
        keys: list[str] = []
        data: dict[str, list[torch.Tensor]] = {}
        if not self.directory.is_dir():
            return keys, data
        for path in sorted(self.directory.glob("shard-*.pt")):
            try:
                shard = _load_shard(path, mmap)
            except Exception:  # a shard cut short by a kill: ignore it, it gets recomputed
                continue
            keys.extend(shard["keys"])
            for name, tensor in shard["data"].items():
                data.setdefault(name, []).append(tensor)
        return keys, data

    def check_writable(self) -> None:
        """Before the work whose result goes here: a cache folder that cannot be written
        (a file in the way, no permission) is a ValueError naming it, not a traceback
        after every image was decoded."""
        existing = self.directory
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
            return
        problem = "is a file, not a folder" if existing.exists() and not existing.is_dir() else "is not writable"
        raise ValueError(f"cannot write the cache in {self.directory}: {existing} {problem}; "
                         "pass --cache-dir DIR (or set GOOD4CIR_CACHE) to a folder that can be written")

    def write(self, keys: list[str], data: dict[str, torch.Tensor]) -> None:
        if not keys:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"shard-{uuid.uuid4().hex[:12]}.pt"
        tmp = self.directory / (name + ".tmp")
        torch.save({"keys": list(keys), "data": data}, str(tmp))
        tmp.replace(self.directory / name)


def _decode(path: str, pil_transform) -> np.ndarray:
    image = pil_transform(load_image_rgb(path))
    array = np.asarray(image, dtype=np.uint8)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


class PixelCache:
    """Images decoded once into uint8 (3, H, W) tensors at the model's input size."""

    def __init__(self, cache_dir: Path, pil_transform, chunk: int = 2048):
        self.pil_transform = pil_transform
        tag = _digest(repr(pil_transform))[:16]
        self.shards = _Shards(Path(cache_dir) / "pixels" / tag)
        self.chunk = chunk

    def load(self, paths: dict[str, str], progress: bool = True
             ) -> tuple[torch.Tensor, dict[str, int], dict[str, str]]:
        """Pixels for every key of `paths` (key -> file): (tensor, key -> row, failures).

        A failed image is reported by key with its reason; the rest load."""
        keys, data = self.shards.read(mmap=True)
        where = {key: i for i, key in enumerate(keys)}
        missing = [key for key in paths if key not in where]
        if missing:
            self.shards.check_writable()
        failures: dict[str, str] = {}
        new_keys: list[str] = []
        new_arrays: list[np.ndarray] = []
        for key in tqdm(missing, desc="decoding images", unit="img", disable=not progress or not missing):
            try:
                new_arrays.append(_decode(paths[key], self.pil_transform))
                new_keys.append(key)
            except Exception as exc:  # one bad image never stops the run
                failures[key] = f"{paths[key]}: {exc}"
            if len(new_keys) >= self.chunk:
                self._flush(new_keys, new_arrays)
                new_keys, new_arrays = [], []
        self._flush(new_keys, new_arrays)
        if missing and len(failures) < len(missing):
            keys, data = self.shards.read(mmap=True)
            where = {key: i for i, key in enumerate(keys)}
        wanted = [key for key in paths if key in where]
        if not wanted:
            return torch.zeros((0, 3, 1, 1), dtype=torch.uint8), {}, failures
        pixels = _gather(data["pixels"], [where[key] for key in wanted])
        return pixels, {key: i for i, key in enumerate(wanted)}, failures

    def lookup(self, keys) -> tuple[torch.Tensor, dict[str, int]]:
        """The pixels already decoded for any of `keys`, without decoding the rest:
        (tensor, key -> row) for the keys found."""
        wanted = set(keys)
        cached_keys, data = self.shards.read(mmap=True)
        found: dict[str, int] = {}
        parts = []
        offset = 0
        for shard in data.get("pixels", []):  # picked shard by shard: no copy of the whole cache
            rows = []
            for i, key in enumerate(cached_keys[offset:offset + len(shard)]):
                if key in wanted and key not in found:
                    found[key] = len(found)
                    rows.append(i)
            if rows:
                parts.append(shard[torch.tensor(rows)])
            offset += len(shard)
        if not parts:
            return torch.zeros((0, 3, 1, 1), dtype=torch.uint8), {}
        return torch.cat(parts), found

    def _flush(self, keys: list[str], arrays: list[np.ndarray]) -> None:
        if keys:
            self.shards.write(keys, {"pixels": torch.from_numpy(np.stack(arrays))})


def _gather(shards: list[torch.Tensor], rows: list[int]) -> torch.Tensor:
    """Rows (numbered across `shards` in order) copied out shard by shard: the cache is
    shared by every dataset and split, and a run wants only its own images of it, so
    neither the whole cache nor a concatenation of it is ever held in memory."""
    starts = np.cumsum([0] + [len(shard) for shard in shards])
    rows_np = np.asarray(rows, dtype=np.int64)
    which = np.searchsorted(starts, rows_np, side="right") - 1
    out = torch.empty((len(rows), *shards[0].shape[1:]), dtype=shards[0].dtype)
    for index in np.unique(which):
        positions = np.nonzero(which == index)[0]
        local = torch.from_numpy(rows_np[positions] - starts[index])
        out[torch.from_numpy(positions)] = shards[index][local]
    return out


def encoder_fingerprint(encoder) -> str:
    """sha256 over the encoder's name, input size and weights: a cache key that changes
    whenever the features would."""
    digest = hashlib.sha256(f"{encoder.model_name}|{encoder.image_size}".encode())
    for name, tensor in sorted(encoder.clip.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """Frozen-encoder features, computed once per (encoder weights, image or text)."""

    def __init__(self, cache_dir: Path, encoder, batch_size: int = 128):
        self.encoder = encoder
        self.fingerprint = encoder_fingerprint(encoder)
        base = Path(cache_dir) / "features" / self.fingerprint[:24]
        self.image_shards = _Shards(base / "images")
        self.text_shards = _Shards(base / "texts")
        self.batch_size = batch_size

    @torch.no_grad()
    def image_features(self, keys: Sequence[str], pixels_of: Callable[[list[str]], torch.Tensor],
                       progress: bool = True) -> dict[str, torch.Tensor]:
        """{'pooled': (N, D), 'tokens': (N, P, W)} float16 rows in `keys` order.
        pixels_of(keys) gives the encoder's input for a batch of keys."""
        stored, data = self.image_shards.read(mmap=True)
        where = {key: i for i, key in enumerate(stored)}
        missing = [key for key in dict.fromkeys(keys) if key not in where]
        if missing:
            self.image_shards.check_writable()
            pooled, tokens = [], []
            for start in tqdm(range(0, len(missing), self.batch_size), desc="caching image features",
                              disable=not progress):
                batch = missing[start:start + self.batch_size]
                out = self.encoder.encode_image_tokens(pixels_of(batch))
                pooled.append(out.pooled.half().cpu())
                tokens.append(out.tokens.half().cpu())
            self.image_shards.write(missing, {"pooled": torch.cat(pooled), "tokens": torch.cat(tokens)})
            stored, data = self.image_shards.read(mmap=True)
            where = {key: i for i, key in enumerate(stored)}
        rows = [where[key] for key in keys]
        return {name: _gather(parts, rows) for name, parts in data.items()}

    @torch.no_grad()
    def text_features(self, texts: Sequence[str], progress: bool = True) -> dict[str, torch.Tensor]:
        """{'pooled': (N, D), 'tokens': (N, L, W), 'padding_mask': (N, L)} for `texts`."""
        stored, data = self.text_shards.read()
        where = {key: i for i, key in enumerate(stored)}
        unique = list(dict.fromkeys(texts))
        missing = [t for t in unique if _digest(t) not in where]
        if missing:
            self.text_shards.check_writable()
            ctx = self.encoder.context_length
            pooled = torch.zeros((len(missing), self.encoder.embed_dim), dtype=torch.float16)
            tokens = torch.zeros((len(missing), ctx, self.encoder.text_width), dtype=torch.float16)
            mask = torch.ones((len(missing), ctx), dtype=torch.bool)
            for start in tqdm(range(0, len(missing), self.batch_size), desc="caching text features",
                              disable=not progress):
                batch = missing[start:start + self.batch_size]
                out = self.encoder.encode_text_ids(self.encoder.tokenize(batch))
                n, length = out.tokens.shape[:2]
                pooled[start:start + n] = out.pooled.half()
                tokens[start:start + n, :length] = out.tokens.half()
                mask[start:start + n, :length] = out.padding_mask
            # Stored only as wide as the longest caption: most are far below 77 tokens.
            width = max(int((~mask).sum(dim=1).max().item()), 1)
            self.text_shards.write([_digest(t) for t in missing],
                                   {"pooled": pooled, "tokens": tokens[:, :width].contiguous(),
                                    "padding_mask": mask[:, :width].contiguous()})
            stored, data = self.text_shards.read()
            where = {key: i for i, key in enumerate(stored)}
        rows = torch.tensor([where[_digest(t)] for t in texts], dtype=torch.long)
        width = max(part.shape[1] for part in data["tokens"])
        tokens = torch.cat([F.pad(p, (0, 0, 0, width - p.shape[1])) for p in data["tokens"]])
        mask = torch.cat([F.pad(m, (0, width - m.shape[1]), value=True) for m in data["padding_mask"]])
        return {"pooled": torch.cat(data["pooled"])[rows], "tokens": tokens[rows],
                "padding_mask": mask[rows]}


def trim_text_features(tokens: torch.Tensor, padding_mask: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns a batch does not need (cached texts are context-length wide)."""
    length = max(int((~padding_mask).sum(dim=1).max().item()), 1)
    return tokens[:, :length], padding_mask[:, :length]


def unique_in_order(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
