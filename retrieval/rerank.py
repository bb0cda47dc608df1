"""The second stage: a pair scorer that re-ranks the first stage's top candidates.

The fusion model embeds the query and every gallery image apart, so it must squeeze
"what changed" out of two independent vectors. Near-duplicates differ in one object's
colour or size; on the demo world that detail is lost in the embeddings (the trained
fusion model ranks below plain pixel distance). The pair scorer looks at the reference
and one candidate together, through their pixel difference, and matches what changed
against the caption. It cannot index a gallery, so it re-scores the first stage's
top `top_k` per query: in `good4cir eval`, `good4cir query` and the Retrieve tab alike.

Score of (reference r, candidate c, caption t): cos(f(r, c, c - r), g(t)), where f is a
small CNN over the three stacked images and g a copy of the checkpoint's text tower plus
a bag of the caption's words.
Pair embeddings do not depend on the caption, so all captions of one reference share
them. A scorer trained on mirrored pairs also scores each pair mirrored, with "left" and
"right" swapped in the caption, and averages the two views.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .device import device_of
from .encoders import Encoder, run_text_tower
from .mirror import mirror_text

RERANK_FILE = "rerank.pt"
# First-stage candidates re-ranked per query. Demo world (one trained checkpoint): 100
# instead of 50 lifts the ceiling (first-stage recall@50 91.1 -> @100 94.9) and test R@1
# 54.1 -> 55.0, R@5 90.8 -> 94.3, for twice the pair scoring per query.
DEFAULT_TOP_K = 100
INPUT_SIZE = 64  # pixels per side the CNN reads; other input sizes are resized to it


def bf16_is_fast() -> bool:
    """Whether this CPU has bf16 matrix units (AMX or AVX512-BF16).

    There the scorer's convolutions run about 3x faster in bf16 with channels-last
    memory (0.31 -> 0.10 s for a training step's 208 pairs on the 2-core dev machine),
    so the re-ranker gets about twice the epochs in its budget (demo world: 12 -> 26).
    Elsewhere bf16 is emulated and slower, so the scorer stays in fp32.
    """
    if os.environ.get("GOOD4CIR_BF16", "").strip() == "0":
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check is not None and bool(check()) for check in checks)


class _TextCopy(nn.Module):
    """An independent copy of an open_clip text tower (the parts `run_text_tower` uses)."""

    def __init__(self, parts: dict[str, Any]):
        super().__init__()
        self.token_embedding = copy.deepcopy(parts["token_embedding"])
        self.transformer = copy.deepcopy(parts["transformer"])
        self.ln_final = copy.deepcopy(parts["ln_final"])
        self.positional_embedding = nn.Parameter(parts["positional_embedding"].detach().clone())
        projection = parts["text_projection"]
        if isinstance(projection, nn.Module):
            self.text_projection = copy.deepcopy(projection)
        elif projection is not None:
            self.text_projection = nn.Parameter(projection.detach().clone())
        else:
            self.text_projection = None
        mask = parts["attn_mask"]
        self.register_buffer("attn_mask", None if mask is None else mask.clone(), persistent=False)

    @property
    def out_dim(self) -> int:
        projection = self.text_projection
        if projection is None:
            return int(self.token_embedding.embedding_dim)
        return int(projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        parts = {"token_embedding": self.token_embedding, "positional_embedding": self.positional_embedding,
                 "transformer": self.transformer, "ln_final": self.ln_final,
                 "text_projection": self.text_projection, "attn_mask": self.attn_mask}
        return run_text_tower(parts, ids).pooled


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
    )


class PairScorer(nn.Module):
    """cos(CNN(reference, candidate, candidate - reference), text tower(caption) + word bag)."""

    def __init__(self, text_parts: dict[str, Any], tokenize: Callable[[Sequence[str]], torch.Tensor],
                 width: int = 32, word_bag: bool = True):
        super().__init__()
        self.width = width
        self.word_bag = word_bag
        self.tokenize = tokenize
        # Averaging in the mirrored view, for scorers trained on mirrored pairs (set by
        # `load_pair_scorer`): demo world, test R@1 61.2 -> 61.8, Rsubset@1 64.6 -> 65.1.
        self.mirror = False
        self.text = _TextCopy(text_parts)
        dim = self.text.out_dim
        if word_bag:
            # The mean of the caption's word embeddings, projected and added to the text
            # tower's output: an additive path, so "purple" + "rug" means something even
            # where training never showed a purple rug. It learns at the full rate (the
            # tower at TEXT_LR): a bag has too little capacity to memorise captions.
            # Demo world, one first stage, three seeds each, mean R@1 / Rsubset@1:
            # val 62.7 / 67.3 -> 64.3 / 69.3, test 64.1 / 67.2 -> 64.0 / 67.6; test
            # Rsubset@1 on held-out combinations 62.3 -> 65.2. Small next to the seeds'
            # spread (test Rsubset@1 +2.8, +0.6, -2.0). It costs about 10% of the epochs.
            tokens = text_parts["token_embedding"]
            self.words = nn.Embedding(tokens.num_embeddings, tokens.embedding_dim)
            with torch.no_grad():
                self.words.weight.copy_(tokens.weight)
            self.words_head = nn.Linear(tokens.embedding_dim, dim)
        # 64 -> 32 (stride) -> 16 -> 8 (pools) -> 4x4 cells: a coarse map of where things
        # changed survives into the embedding, so "on the left" can be checked.
        self.blocks = nn.ModuleList([_block(9, width, stride=2), _block(width, 2 * width),
                                     _block(2 * width, 4 * width)])
        self.head = nn.Linear(4 * width * 16, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.low_precision = bf16_is_fast()
        if self.low_precision:
            self.blocks.to(memory_format=torch.channels_last)

    def _prepare(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8.to(self.logit_scale.device, non_blocking=True).float() / 255.0
        if x.shape[-1] != INPUT_SIZE or x.shape[-2] != INPUT_SIZE:
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="area")
        return (x - 0.5) / 0.25

    def encode_pairs(self, references: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 each -> (N, D) unit vectors."""
        r, c = self._prepare(references), self._prepare(candidates)
        x = torch.cat([r, c, c - r], dim=1)
        low = self.low_precision and x.device.type == "cpu"
        if low:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            x = F.max_pool2d(self.blocks[0](x), 2)
            x = F.max_pool2d(self.blocks[1](x), 2)
            x = F.adaptive_max_pool2d(self.blocks[2](x), 4).flatten(1)
        # The head and the cosine stay in fp32: bf16 scores would tie among near-duplicates.
        return F.normalize(self.head(x.float()), dim=-1)

    def encode_texts(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.logit_scale.device)
        out = self.text(ids)
        if self.word_bag:
            # Words lie between the start token and the end token (the largest id, as
            # `run_text_tower` pools).
            position = torch.arange(ids.shape[1], device=ids.device)[None]
            inside = ((position > 0) & (position < ids.argmax(dim=-1, keepdim=True))).float()
            bag = (self.words(ids) * inside[..., None]).sum(1) / inside.sum(1, keepdim=True).clamp(min=1)
            out = out + self.words_head(bag)
        return F.normalize(out, dim=-1)

    def score(self, pairs: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(N, D) pair embeddings against one caption's (D,) embedding -> (N,) scores;
        with views, (V, N, D) against (V, D), averaged over the views."""
        if pairs.dim() == 3:
            return torch.einsum("vnd,vd->n", pairs, text) / pairs.shape[0]
        return pairs @ text

    def encode_pair_views(self, references: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(V, N, D): the pairs as given and, for a mirroring scorer, mirrored."""
        views = [self.encode_pairs(references, candidates)]
        if self.mirror:
            views.append(self.encode_pairs(references.flip(-1), candidates.flip(-1)))
        return torch.stack(views)

    def encode_caption_views(self, texts: Sequence[str]) -> torch.Tensor:
        """(V, B, D): the captions as given and, for a mirroring scorer, mirrored."""
        texts = [t or "" for t in texts]
        views = [texts] + ([[mirror_text(t) for t in texts]] if self.mirror else [])
        return torch.stack([self.encode_texts(self.tokenize(v)) for v in views])


def build_pair_scorer(encoder: Encoder, width: int = 32, word_bag: bool = True) -> PairScorer:
    """A pair scorer whose text tower (and word bag) start as a copy of `encoder`'s, on
    the encoder's device."""
    scorer = PairScorer(encoder.text_tower(), encoder.tokenize, width=width, word_bag=word_bag)
    return scorer.to(device_of(encoder.clip))


def save_pair_scorer(path: Path, scorer: PairScorer, extra: Optional[dict] = None) -> None:
    payload = {"state": scorer.state_dict(), "width": scorer.width, "word_bag": scorer.word_bag,
               **(extra or {})}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, str(tmp))
    tmp.replace(path)


def load_pair_scorer(checkpoint_dir: str | Path, encoder: Encoder
                     ) -> Optional[tuple[PairScorer, dict[str, Any]]]:
    """The checkpoint's pair scorer and what training recorded, or None when it has none
    or training found it no better than the first stage on validation."""
    path = Path(checkpoint_dir) / RERANK_FILE
    if not path.is_file():
        return None
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=False)
    except (PermissionError, IsADirectoryError):
        raise
    except Exception as exc:  # cut short (torch says OSError, RuntimeError, ...)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise ValueError(f"{path} cannot be read as a re-ranker ({reason}); pass --no-rerank to use "
                         "the fusion model alone, or retrain") from None
    info = {k: v for k, v in payload.items() if k != "state"}
    if not info.get("enabled", True):
        return None
    # Scorers saved before the word bag existed have none.
    scorer = build_pair_scorer(encoder, width=int(payload.get("width", 32)),
                               word_bag=bool(payload.get("word_bag", False)))
    scorer.load_state_dict(payload["state"])
    scorer.mirror = bool(payload.get("mirror", False))
    return scorer.eval(), info


def top_candidates(first: np.ndarray, exclude_cols: Sequence[Optional[int]], top_k: int) -> np.ndarray:
    """Per row of a (Q, G) score matrix, the columns of its `top_k` best scores, best
    first, leaving out that row's excluded column (its reference)."""
    scores = first.astype(np.float32, copy=True)
    for row, col in enumerate(exclude_cols):
        if col is not None:
            scores[row, col] = -np.inf
    k = min(top_k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def merge_reranked(first: np.ndarray, candidates: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The final score matrix: each row's candidates rank by the second-stage scores,
    all above the rest, which keep their first-stage order."""
    out = first.astype(np.float32, copy=True)
    lift = np.nan_to_num(first.max(axis=1, keepdims=True), neginf=0.0) + 3.0
    np.put_along_axis(out, candidates, lift + second.astype(np.float32), axis=1)
    return out


@torch.no_grad()
def rerank_matrix(scorer: PairScorer, first: np.ndarray, reference_keys: Sequence[str],
                  texts: Sequence[str], gallery_keys: Sequence[str], pixels: torch.Tensor,
                  row_of: dict[str, int], top_k: int = DEFAULT_TOP_K, batch_size: int = 256,
                  progress: bool = False) -> np.ndarray:
    """Re-rank every query of a first-stage (Q, G) score matrix; returns the final one.

    Each distinct (reference, candidate) pair is encoded once, shared by every caption
    that asks about that reference."""
    scorer.eval()
    col_of = {key: i for i, key in enumerate(gallery_keys)}
    candidates = top_candidates(first, [col_of.get(k) for k in reference_keys], top_k)
    pair_of: dict[tuple[int, int], int] = {}
    for q, ref in enumerate(reference_keys):
        ref_row = row_of[ref]
        for col in candidates[q]:
            pair_of.setdefault((ref_row, row_of[gallery_keys[col]]), len(pair_of))
    pairs = torch.tensor(list(pair_of), dtype=torch.long).view(-1, 2)
    pair_emb = []
    for s in tqdm(range(0, len(pairs), batch_size), desc="re-ranking", unit="batch",
                  disable=not progress):
        chunk = pairs[s:s + batch_size]
        pair_emb.append(scorer.encode_pair_views(pixels[chunk[:, 0]], pixels[chunk[:, 1]]).cpu())
    pair_emb = torch.cat(pair_emb, dim=1) if pair_emb else torch.zeros((1, 0, 1))
    # Scored on the CPU: one small product per query, gathered from all the pairs.
    text_emb = torch.cat([scorer.encode_caption_views(texts[s:s + batch_size]).cpu()
                          for s in range(0, len(texts), batch_size)], dim=1)
    second = np.zeros(candidates.shape, dtype=np.float32)
    for q, ref in enumerate(reference_keys):
        ref_row = row_of[ref]
        rows = [pair_of[(ref_row, row_of[gallery_keys[col]])] for col in candidates[q]]
        second[q] = scorer.score(pair_emb[:, rows], text_emb[:, q]).numpy()
    return merge_reranked(first, candidates, second)
