"""Training the pair scorer (`retrieval.rerank`) once the first stage is trained.

Each training query scores its target against the negatives a re-ranker meets in the
first stage's top candidates: the members of its image set (near-duplicates of the
target), the images of other pairs with the same reference (siblings: the same room
edited otherwise) and a few other pairs' targets. Candidates are pairs, not a shared
gallery, so each direction is a softmax over its own list: the caption over those
candidates, and the (reference, target) pair over its caption, its siblings' captions
and the batch's other captions.

Validation re-ranks the first stage's top candidates of the validation queries each
epoch, in the plain view only (the mirrored view doubles its cost). The saved scorer is
the average of the last epochs' weights (`AVERAGE_LAST`); it is kept (`enabled`) only if
it beats the first stage alone on validation Recall@1.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import Triplet
from .evaluate import build_queries, embed, score_matrix
from .mirror import mirror_text
from .paste import paste_unchanged
from .rerank import DEFAULT_TOP_K, RERANK_FILE, build_pair_scorer, rerank_matrix, save_pair_scorer

log = logging.getLogger(__name__)

# Measured on the demo world (2,000 pairs, 8 minutes, scripts in the README's report):
# lr 1e-3 and 16 queries per step with about 13 candidates each.
LR = 1e-3
QUERIES_PER_STEP = 16
# Weight of the other direction: the target pair against its own caption, the captions
# of the pairs that share its reference, and the batch's other captions. Demo world,
# 7.1 min on one first stage: val R@1 45 (four other runs: 42.5-46.6) -> 49.5, test R@1
# 44.8 -> 47.8 and R@5 91.9 -> 94.7, Rsubset@1 55.7 -> 52.9 (noise is about 3).
TEXT_LOSS = 1.0
# Learning rate of the copied text tower, relative to LR. At the full rate it memorises
# the training captions: demo world, one first stage, 7.1 min, val R@1 53.3 -> 60.4 and
# Rsubset@1 58.0 -> 65.1 at a tenth (test 51.4 -> 61.2, 54.2 -> 64.6).
TEXT_LR = 0.1
SIBLINGS = 4
OTHER_TARGETS = 4
# Odds that a training step sees its images mirrored, with "left" and "right" swapped in
# every caption (`mirror.mirror_text`): the scorer overfits its 1,600 demo-world pairs
# within about 10 epochs.
FLIP = 0.5
# Odds that a training query gets another image pasted where its reference and candidates
# agree (`paste.paste_unchanged`; what it was measured to do is in that module). At odds
# 1.0, demo world val + test R@1 / Rsubset@1 61.2 / 66.6 against 64.2 / 68.4 at 0.5.
PASTE = 0.5
# The saved scorer averages the weights of the last epochs (`_average`) instead of being
# the epoch with the best validation R@1, which is a maximum over noisy numbers. Demo
# world, three runs on one first stage, test R@1 / Rsubset@1 of the best epoch against
# the average of the last 5: 59.0 / 63.2 -> 61.5 / 65.3, 61.5 / 66.4 -> 61.3 / 66.4,
# 53.2 / 57.9 -> 54.7 / 60.3 (the last with half the training pairs).
AVERAGE_LAST = 5
# Validation each epoch re-ranks at most this many candidates: it only draws the curve and
# checks the saved scorer, and at the full depth it would take a fifth of the re-ranker's
# training time.
VAL_TOP_K = 50


@dataclass
class RerankOutcome:
    enabled: bool
    best: dict[str, Any]
    first_stage_val: dict[str, Any]
    history: dict[str, Any]


def _average(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of floating-point entries; counters (BatchNorm's) from the last state."""
    return {name: (torch.stack([s[name] for s in states]).mean(0) if value.is_floating_point() else value)
            for name, value in states[-1].items()}


@torch.no_grad()
def _recalibrate_batch_norm(scorer, pixels: torch.Tensor, candidates: "_Candidates", rng: random.Random,
                            flip_odds: float, batches: int = 50) -> None:
    """Recompute BatchNorm statistics on training queries, as the scorer sees them at test
    time (not pasted). Averaged weights shift every layer's activations, so the averaged
    running statistics no longer describe them."""
    norms = [m for m in scorer.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches below
    scorer.train()
    order = list(range(len(candidates.samples)))
    rng.shuffle(order)
    for s in range(0, min(len(order), batches * QUERIES_PER_STEP), QUERIES_PER_STEP):
        batch = order[s:s + QUERIES_PER_STEP]
        _, ref_rows, cand_rows = candidates.pairs_for_batch(batch, rng)
        refs, cands = pixels[ref_rows], pixels[cand_rows]
        if flip_odds and rng.random() < flip_odds:
            refs, cands = refs.flip(-1), cands.flip(-1)
        scorer.encode_pairs(refs, cands)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    scorer.eval()


class _Candidates:
    """Per training pair: rows of its target first, then its negatives."""

    def __init__(self, triplets: Sequence[Triplet], row_of: dict[str, int]):
        self.samples = []
        by_reference: dict[str, list[int]] = {}
        for i, t in enumerate(triplets):
            by_reference.setdefault(t.reference, []).append(i)
        self.sibling_pairs = [[j for j in by_reference[t.reference] if j != i] for i, t in enumerate(triplets)]
        for i, t in enumerate(triplets):
            own = [row_of[k] for k in (t.img_set or [])
                   if k in row_of and k not in (t.reference, t.target)]
            siblings = []
            for j in by_reference[t.reference]:
                if j == i:
                    continue
                other = triplets[j]
                siblings += [row_of[k] for k in [other.target, *(other.img_set or [])]
                             if k in row_of and k not in (t.reference, t.target)]
            self.samples.append((row_of[t.reference], row_of[t.target],
                                 list(dict.fromkeys(own)), list(dict.fromkeys(siblings))))

    def for_batch(self, indexes: Sequence[int], rng: random.Random) -> list[list[int]]:
        targets = [self.samples[i][1] for i in indexes]
        out = []
        for i in indexes:
            ref, target, own, siblings = self.samples[i]
            others = [t for t in rng.sample(targets, min(OTHER_TARGETS + 1, len(targets)))
                      if t != target][:OTHER_TARGETS]
            picked = rng.sample(siblings, min(SIBLINGS, len(siblings)))
            rows = [target] + [r for r in dict.fromkeys(own + picked + others) if r not in (target, ref)]
            out.append(rows)
        return out

    def pairs_for_batch(self, indexes: Sequence[int], rng: random.Random
                        ) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
        """`for_batch`'s candidate rows, and the pixel rows of every (reference, candidate)
        pair they make, flattened in that order."""
        rows = self.for_batch(indexes, rng)
        refs = torch.tensor([self.samples[i][0] for i, r in zip(indexes, rows) for _ in r])
        return rows, refs, torch.tensor([c for r in rows for c in r])


def train_pair_scorer(model, pixels: torch.Tensor, row_of: dict[str, int],
                      train_set: Sequence[Triplet], val_set: Sequence[Triplet],
                      val_gallery: Sequence[str], out: Path, seconds: Optional[float] = None,
                      epochs: Optional[int] = None, seed: int = 0, top_k: int = DEFAULT_TOP_K,
                      val_queries: int = 400, mirror: bool = True, progress: bool = True) -> RerankOutcome:
    """Train on top of the (trained, fixed) first stage `model`; writes `out/rerank.pt`."""
    from .train import lr_factor, show_step, val_brief

    if seconds is None and epochs is None:
        raise ValueError("give the pair scorer a time budget or a number of epochs")
    started = time.monotonic()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model.eval()
    scorer = build_pair_scorer(model.encoder)
    scorer.requires_grad_(True)  # the copy inherits frozen flags in frozen-encoder mode
    named = [(n, p) for n, p in scorer.named_parameters() if n != "logit_scale"]
    groups = [
        {"params": [p for n, p in named if not n.startswith("text.")], "weight_decay": 0.05, "base_lr": LR},
        {"params": [p for n, p in named if n.startswith("text.")], "weight_decay": 0.05,
         "base_lr": LR * TEXT_LR},
        {"params": [scorer.logit_scale], "weight_decay": 0.0, "base_lr": LR}]
    # The fused CPU kernel, as the first stage uses: the text copy's token embedding and
    # the word bag are 6M weights each, updated every step. Demo world, 2 cores: the
    # optimiser step 47 -> 10 ms of a 215 ms training step; 7.1 min on one first stage
    # gave 27-29 epochs instead of 22. Val / test Rsubset@1, seed 0: 69.8 / 69.2 -> 71.3 /
    # 71.1; seed 1: 72.1 / 67.9 -> 68.5 / 68.6 (inside the seeds' spread either way).
    try:
        optimizer = torch.optim.AdamW(groups, lr=LR, fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(groups, lr=LR)

    texts = list(dict.fromkeys(c for t in train_set for c in t.captions))
    text_row = {text: i for i, text in enumerate(texts)}
    token_ids = model.encoder.tokenize(texts)
    flip_odds = FLIP if mirror else 0.0
    mirrored_ids = model.encoder.tokenize([mirror_text(t) for t in texts]) if flip_odds else token_ids
    caption_rows = [[text_row[c] for c in t.captions] for t in train_set]
    candidates = _Candidates(train_set, row_of)
    steps_per_epoch = len(train_set) // QUERIES_PER_STEP
    if steps_per_epoch == 0:
        raise ValueError(f"too few training pairs for the pair scorer ({len(train_set)})")

    # The first stage is fixed: its validation scores are computed once.
    queries = build_queries(val_set, max_queries=val_queries) if val_set else None
    first = first_val = None
    if queries is not None and len(queries):
        emb = embed(model, pixels, row_of, val_gallery, queries, baselines=False)
        first = emb["query"] @ emb["gallery"].T
        first_val = score_matrix(first, val_gallery, queries)

    history: dict[str, Any] = {"loss": [], "epochs": [], "first_stage_val": first_val}
    best: dict[str, Any] = {"score": -1.0}
    total_steps = epochs * steps_per_epoch if epochs is not None else None
    step, epoch, val_seconds = 0, 0, 0.0

    def elapsed() -> float:
        return time.monotonic() - started

    def fraction() -> float:
        return elapsed() / seconds if seconds is not None else step / total_steps

    def out_of_budget() -> bool:
        if seconds is not None:
            return elapsed() + val_seconds >= seconds
        return step >= total_steps

    def save(val: dict, enabled: bool, averaged: Sequence[int] = ()) -> None:
        save_pair_scorer(out / RERANK_FILE, scorer, {
            "epoch": epoch, "averaged_epochs": list(averaged), "val": val, "first_stage_val": first_val,
            "top_k": top_k, "enabled": enabled, "mirror": flip_odds > 0})

    def validate() -> dict[str, Any]:
        if first is None:
            return {}
        final = rerank_matrix(scorer, first, queries.reference_keys, queries.texts, val_gallery,
                              pixels, row_of, top_k=min(top_k, VAL_TOP_K))
        return score_matrix(final, val_gallery, queries)

    recent: collections.deque = collections.deque(maxlen=AVERAGE_LAST)
    bar = tqdm(total=int(seconds) if seconds is not None else total_steps, disable=not progress,
               unit="s" if seconds is not None else "step", desc="training re-ranker")
    done = out_of_budget()
    while not done:
        scorer.train()
        order = list(range(len(train_set)))
        rng.shuffle(order)
        losses = []
        for s in range(0, steps_per_epoch * QUERIES_PER_STEP, QUERIES_PER_STEP):
            factor = lr_factor(min(fraction(), 1.0), 0.05, 0.02)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            batch = order[s:s + QUERIES_PER_STEP]
            rows, refs, cands = candidates.pairs_for_batch(batch, rng)
            flip = flip_odds > 0 and rng.random() < flip_odds
            ref_px, cand_px = paste_unchanged(pixels[refs], pixels[cands], [len(r) for r in rows], rng, PASTE)
            if flip:
                ref_px, cand_px = ref_px.flip(-1), cand_px.flip(-1)
            pair_emb = scorer.encode_pairs(ref_px, cand_px)
            chosen = [rng.choice(caption_rows[i]) for i in batch]
            # Captions of the pairs that share each query's reference: the other direction.
            sibling_texts = [[rng.choice(caption_rows[j]) for j in candidates.sibling_pairs[i]]
                             for i in batch] if TEXT_LOSS else [[] for _ in batch]
            extra = [row for rows_ in sibling_texts for row in rows_]
            text_emb = scorer.encode_texts((mirrored_ids if flip else token_ids)[chosen + extra])
            scale = scorer.logit_scale.exp()
            loss, at, extra_at = 0.0, 0, len(batch)
            for j, r in enumerate(rows):
                logits = scale * scorer.score(pair_emb[at:at + len(r)], text_emb[j])
                loss = loss + F.cross_entropy(logits[None], torch.zeros(1, dtype=torch.long, device=logits.device))
                if TEXT_LOSS:
                    # The target's pair against its own caption, its siblings' captions and
                    # the other queries' captions.
                    mine = text_emb[extra_at:extra_at + len(sibling_texts[j])]
                    extra_at += len(sibling_texts[j])
                    others = torch.cat([text_emb[j:j + 1], mine, text_emb[:len(batch)][
                        [k for k in range(len(batch)) if k != j and chosen[k] != chosen[j]]]])
                    logits = scale * (others @ pair_emb[at])
                    loss = loss + TEXT_LOSS * F.cross_entropy(logits[None], torch.zeros(1, dtype=torch.long, device=logits.device))
                at += len(r)
            loss = loss / len(rows)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(scorer.parameters(), 5.0)
            optimizer.step()
            with torch.no_grad():
                scorer.logit_scale.clamp_(0, math.log(100))
            step += 1
            losses.append(loss.item())
            history["loss"].append([step, round(loss.item(), 5)])
            show_step(bar, seconds, elapsed(), epoch, loss.item())
            if out_of_budget():
                done = True
                break
        epoch += 1
        if epochs is not None and epoch >= epochs:
            done = True
        recent.append({name: value.detach().clone() for name, value in scorer.state_dict().items()})
        t0 = time.monotonic()
        val = validate()
        # Twice: the average is validated once more at the end.
        val_seconds = 2 * (time.monotonic() - t0)
        mean_loss = float(np.mean(losses)) if losses else float("nan")
        history["epochs"].append({"epoch": epoch, "step": step, "loss": mean_loss,
                                  "seconds": round(elapsed(), 1), "val": val})
        score = val.get("recall", {}).get("1", -mean_loss)
        if score > best["score"]:
            best = {"score": score, "epoch": epoch, "val": val}
            save(val, enabled=first_val is None or score > first_val["recall"]["1"])
        print(f"re-ranker epoch {epoch}: loss {mean_loss:.3f}, {elapsed():.0f} s" + val_brief(val),
              file=sys.stderr, flush=True)
        if not done:
            done = out_of_budget()
    bar.close()
    if not history["epochs"]:
        log.warning("no time left in the budget for the re-ranker: not trained")
        return RerankOutcome(enabled=False, best=best, first_stage_val=first_val or {}, history=history)
    history["best_epoch"] = best
    scorer.load_state_dict(_average(recent))
    _recalibrate_batch_norm(scorer, pixels, candidates, rng, flip_odds)
    val = validate()
    averaged = list(range(epoch - len(recent) + 1, epoch + 1))
    best = {"score": val.get("recall", {}).get("1", best["score"]), "epoch": epoch,
            "averaged_epochs": averaged, "val": val}
    enabled = first_val is None or best["score"] > first_val["recall"]["1"]
    save(val, enabled, averaged)
    print(f"re-ranker: the average of epochs {averaged[0]}-{averaged[-1]}" + val_brief(val),
          file=sys.stderr, flush=True)
    if not enabled:
        log.warning("the re-ranker (val R@1 %.1f) did not beat the first stage alone (%.1f); "
                    "it is saved but not used", best["score"], first_val["recall"]["1"])
    return RerankOutcome(enabled=enabled, best=best, first_stage_val=first_val or {}, history=history)
