"""Training the composed-retrieval model (`good4cir train`).

Symmetric InfoNCE with in-batch negatives (temperature 0.07), AdamW, linear warm-up then
cosine decay. Negatives: the batch's other targets, its reference images, and per query
`set_negatives` members of its image set (near-duplicates of the target, where the data
has image sets, as CIRR and the demo world do). The budget is `minutes` (wall time; the
schedule follows elapsed time, so the learning rate reaches its floor when time runs
out) or `epochs`. Two modes:
- full fine-tuning: images come from a uint8 pixel cache decoded once, and all images
  of a batch go through the vision tower in one pass; half the batches are mirrored;
- frozen encoders: image and text features are computed once into a disk cache keyed
  by the encoder's weights, and each step costs only the fusion head.
Validation each epoch; `best.pt` (by validation Recall@1, or recall at the re-ranker's
depth when one trains after it: `selection_score`) and `last.pt` (with the
optimiser, for `resume`), `history.json` and `curves.png` in the output folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import TripletSet, cross_dataset_leaks, load_triplets, train_val_split
from .device import describe, device_of, resolve_device
from .encoders import ImageTokens, TextTokens, is_hub_model
from .evaluate import build_queries, embed, evaluate_embeddings, rankable_triplets
from .features import FeatureCache, PixelCache, default_cache_dir, trim_text_features
from .loss import TEMPERATURE, info_nce
from .mirror import mirror_text
from .model import (BEST_FILE, LAST_FILE, ComposedRetriever, build_model, read_config,
                    read_open_clip_config, save_weights, split_preprocess, write_config,
                    write_open_clip_config)
from .rerank import DEFAULT_TOP_K, RERANK_FILE

log = logging.getLogger(__name__)

# Chosen by measurement on the demo world (see the retrieval report in the README).
DEFAULT_FUSION = "residual"
DEFAULT_MINUTES = 8.0
RANDOM_FROZEN_WARNING = (
    "--freeze-encoders on randomly initialised %s encoders (no --pretrained or --checkpoint): "
    "they never learn, so the fusion head trains on random features and the model ranks worse "
    "than the untrained image baseline. Pass --pretrained TAG or --checkpoint FILE, or train "
    "without --freeze-encoders")


@dataclass
class TrainConfig:
    out: str
    dbs: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    model: str = "tiny"
    pretrained: Optional[str] = None
    checkpoint: Optional[str] = None  # a file of open_clip weights to start from
    image_size: Optional[int] = None
    minutes: Optional[float] = None
    epochs: Optional[int] = None
    freeze_encoders: bool = False
    fusion: str = DEFAULT_FUSION
    fusion_layers: int = 4
    captions: str = "both"
    source: str = "auto"
    include_unreviewed: bool = False
    # 32 over 64: more steps in the same minutes and a little better on the demo world
    # (3 epochs: test R@1 16.3 vs 13.6, Rs@1 31.5 vs 30.4; 70 vs 60 triplets/s).
    batch_size: int = 32
    # Batches hold whole groups of pairs that share a reference image, and each query
    # also scores against the batch's reference images: negatives as hard as the test
    # gallery's near-duplicates, which random in-batch negatives (other rooms) never are.
    hard_negatives: bool = True
    # Per query, this many members of its image set (CIRR's img_set: near-duplicates of
    # the target) join the batch's negatives, where the data has image sets.
    set_negatives: int = 2
    # Weight of a second InfoNCE that aligns the caption's own embedding with the
    # direction from reference to target: a direct signal for the text tower, which
    # from scratch otherwise learns too slowly for the fusion to use it (demo world,
    # 3 min: val R@1 20.5 -> 23.3, Rsubset@1 37.5 -> 41.0, and a shuffled caption now
    # costs R@1 21 -> 12 where before it changed nothing). Skipped with frozen encoders.
    delta_loss: float = 1.0
    # Full fine-tuning: half the batches are mirrored, images and captions alike ("left"
    # and "right" swapped), so the model sees twice the rooms it would. The re-ranker's
    # training steps are mirrored the same way.
    mirror: bool = True
    lr: Optional[float] = None
    encoder_lr_scale: Optional[float] = None
    weight_decay: float = 0.05
    warmup: float = 0.05  # fraction of the budget
    min_lr_ratio: float = 0.02
    seed: int = 0
    cache_dir: Optional[str] = None
    resume: bool = False
    threads: Optional[int] = None
    device: str = "auto"  # retrieval.device.resolve_device
    val_queries: int = 400
    # The pair scorer (retrieval.rerank) trains after the first stage, in the same
    # budget: it takes `rerank_share` of --minutes (the first stage peaks within its
    # first epochs on the demo world) and re-ranks the first stage's top `rerank_top_k`.
    rerank: bool = True
    rerank_share: float = 0.75
    rerank_top_k: int = DEFAULT_TOP_K
    rerank_epochs: Optional[int] = None  # with --epochs; default: the same number
    progress: bool = True


@dataclass
class TrainResult:
    out: Path
    epochs: int
    steps: int
    seconds: float
    triplets_per_second: float
    best: dict[str, Any]
    history: dict[str, Any]


def show_step(bar, budget: Optional[float], elapsed: float, epoch: int, loss: float) -> None:
    """Move a training progress bar: in seconds under a time budget, else in steps."""
    if budget:
        bar.n = min(int(elapsed), int(budget))
        bar.refresh()
    else:
        bar.update(1)
    bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}")


def val_brief(val: dict[str, Any]) -> str:
    """The validation part of an epoch's log line ("" without validation)."""
    if not val:
        return ""
    subset = val.get("recall_subset", {}).get("1")  # absent without image sets
    return (f", val R@1 {val['recall']['1']:.1f} R@5 {val['recall']['5']:.1f}"
            + (f" Rsubset@1 {subset:.1f}" if subset is not None else ""))


def lr_factor(fraction: float, warmup: float, min_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup` of the budget, then cosine down to min_ratio."""
    fraction = min(max(fraction, 0.0), 1.0)
    if warmup > 0 and fraction < warmup:
        return max(fraction / warmup, 1e-3)
    progress = (fraction - warmup) / max(1.0 - warmup, 1e-8)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _param_groups(model: ComposedRetriever, lr: float, encoder_scale: float, weight_decay: float):
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_encoder = name.startswith("encoder.")
        # Norms, biases, embeddings and scalars are not decayed (as open_clip trains).
        no_decay = param.ndim < 2 or "embedding" in name or "ln" in name.split(".")[-2:-1]
        groups.setdefault((is_encoder, no_decay), []).append(param)
    return [
        {"params": params, "lr": lr * (encoder_scale if is_encoder else 1.0),
         "base_lr": lr * (encoder_scale if is_encoder else 1.0),
         "weight_decay": 0.0 if no_decay else weight_decay}
        for (is_encoder, no_decay), params in groups.items()
    ]


class _Batches:
    """The epoch's batches: (reference rows, target rows, text rows) as tensors.

    With `group_by_reference`, pairs sharing a reference image stay in one batch, so
    their targets (the same room with different edits) are each other's negatives."""

    def __init__(self, samples: list[tuple[int, int, list[int], list[int]]], batch_size: int,
                 seed: int, group_by_reference: bool = False, set_negatives: int = 0):
        self.samples = samples
        self.set_negatives = set_negatives
        self.batch_size = min(batch_size, len(samples))
        self.seed = seed
        self.group_by_reference = group_by_reference

    def _order(self, rng: random.Random) -> list[int]:
        if not self.group_by_reference:
            order = list(range(len(self.samples)))
            rng.shuffle(order)
            return order
        groups: dict[int, list[int]] = {}
        for i, sample in enumerate(self.samples):
            groups.setdefault(sample[0], []).append(i)
        chunks = list(groups.values())
        rng.shuffle(chunks)
        return [i for chunk in chunks for i in chunk]

    def epoch(self, number: int):
        rng = random.Random(self.seed * 100_003 + number)
        order = self._order(rng)
        for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
            chosen = [self.samples[i] for i in order[start:start + self.batch_size]]
            negatives = [rng.sample(c[3], min(self.set_negatives, len(c[3]))) for c in chosen]
            yield (torch.tensor([c[0] for c in chosen]), torch.tensor([c[1] for c in chosen]),
                   torch.tensor([rng.choice(c[2]) for c in chosen]),
                   torch.tensor([row for rows in negatives for row in rows], dtype=torch.long))

    def __len__(self) -> int:
        return len(self.samples) // self.batch_size


def _model_config(cfg: TrainConfig) -> dict[str, Any]:
    return {
        "model": cfg.model, "image_size": cfg.image_size, "fusion": cfg.fusion,
        "fusion_layers": cfg.fusion_layers, "temperature": TEMPERATURE,
        "init": (f"pretrained:{cfg.pretrained}" if cfg.pretrained else
                 f"checkpoint:{cfg.checkpoint}" if cfg.checkpoint else
                 "hf-hub" if is_hub_model(cfg.model) else "random"),
        "training": {k: v for k, v in asdict(cfg).items() if k not in ("progress",)},
    }


def train(cfg: TrainConfig, data: Optional[TripletSet] = None,
          on_epoch: Optional[Callable[[dict], None]] = None) -> TrainResult:
    """Train per `cfg`; returns where the checkpoints are and what validation saw."""
    out = Path(cfg.out)
    made = not out.exists()
    try:
        return _train(cfg, data, on_epoch)
    except BaseException:
        # A run refused before it wrote anything (bad data, no pairs) leaves no empty
        # --out folder behind to be mistaken for a model.
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _train(cfg: TrainConfig, data: Optional[TripletSet],
           on_epoch: Optional[Callable[[dict], None]]) -> TrainResult:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.minutes is None and cfg.epochs is None:
        cfg.minutes = DEFAULT_MINUTES
    if cfg.minutes is not None and cfg.minutes <= 0 or cfg.epochs is not None and cfg.epochs <= 0:
        raise ValueError("--minutes and --epochs must be positive")
    if cfg.rerank and not 0.0 < cfg.rerank_share < 1.0:
        raise ValueError(f"--rerank-share must be between 0 and 1, got {cfg.rerank_share}")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where the folder should be, or no permission
        raise ValueError(f"cannot write checkpoints to {out}: "
                         + ("it is a file, not a folder" if out.is_file() else exc.strerror or str(exc))) from None
    started = time.monotonic()
    cpu_started = time.process_time()

    if data is None:
        data = load_triplets(cfg.dbs, cfg.files, source=cfg.source, captions=cfg.captions,
                             include_unreviewed=cfg.include_unreviewed)
    train_set, val_set = train_val_split(data, seed=cfg.seed)
    for warning in cross_dataset_leaks(data, train_set, val_set):
        log.warning(warning)
    if train_set and not val_set:
        log.warning("no validation pairs (split val, or pairs with no split): best.pt is the epoch with the "
                    "lowest training loss, and the re-ranker is used without a check that it helps; import "
                    "some pairs with split val to validate")
    val_fingerprint = _triplets_fingerprint(val_set)
    if not train_set:
        splits = sorted({str(t.split) for t in data.triplets})
        raise ValueError(
            f"no training triplets (--source {cfg.source}, --captions {cfg.captions}); "
            + (f"the data's {len(data.triplets)} pairs are all in split {', '.join(splits)}, and "
               "training reads pairs of split train (or with no split)" if data.triplets else
               f"first problem: {data.problems[0]}" if data.problems else "is the store empty?")
        )

    resume_state, saved = None, None
    if cfg.resume and (out / LAST_FILE).is_file():
        saved = read_config(out)
        for key in ("model", "fusion", "image_size", "fusion_layers"):
            if saved.get(key) != _model_config(cfg).get(key):
                raise ValueError(f"cannot resume {out}: it was trained with {key}={saved.get(key)!r}")
        # The optimiser's parameter groups differ between the two modes.
        was_frozen = bool((saved.get("training") or {}).get("freeze_encoders"))
        if was_frozen != cfg.freeze_encoders:
            raise ValueError(f"cannot resume {out}: it was trained {'with' if was_frozen else 'without'} "
                             f"--freeze-encoders; resume it {'with' if was_frozen else 'without'} it too")
        try:
            resume_state = torch.load(str(out / LAST_FILE), map_location="cpu", weights_only=False)
        except (PermissionError, IsADirectoryError):
            raise
        except Exception as exc:  # cut short (torch says OSError, RuntimeError, ...)
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
            raise ValueError(f"cannot resume {out}: {out / LAST_FILE} cannot be read ({reason}); "
                             "train without --resume") from None
        _check_budget_left(cfg, out, resume_state)
    # A pair scorer belongs to the first stage it was trained on: never reuse an old one.
    (out / RERANK_FILE).unlink(missing_ok=True)
    model_config = _model_config(cfg)
    if saved is not None:
        # The weights resumed from were made by the saved run's init (and, without --lr,
        # its learning rate carries on): record those, not this command's defaults.
        model_config["init"] = saved.get("init", model_config["init"])
        if cfg.lr is None:
            model_config["training"]["lr"] = (saved.get("training") or {}).get("lr")
    model = build_model(model_config, pretrained=None if resume_state else cfg.pretrained,
                        checkpoint=None if resume_state else cfg.checkpoint, hub_weights=not resume_state,
                        open_clip_config=read_open_clip_config(out) if resume_state else None)
    if cfg.freeze_encoders and not any(param.requires_grad for name, param in model.named_parameters()
                                       if not name.startswith("encoder.")):
        # Before any image is decoded or encoded: on a real dataset that took an hour first.
        raise ValueError(f"nothing to train: fusion {cfg.fusion!r} has no weights and the encoders are frozen")
    if cfg.freeze_encoders and model_config["init"] == "random":
        # Not refused (tests and benchmarks time this mode on random weights), but a user
        # gets a model worse than no training: on the demo world, 2 epochs gave test
        # R@1 0.5 against 19.9 for the same random encoders' image-only baseline.
        log.warning(RANDOM_FROZEN_WARNING, cfg.model)
    if resume_state:
        model.load_state_dict(resume_state["model"])
    # Before the optimiser exists: its state (and a resumed one's) lives with the weights.
    model.to(device)
    write_config(out, model_config)
    write_open_clip_config(out, model.encoder)

    # Pixels for every image of train and validation, decoded once.
    pil_transform, _, _ = split_preprocess(model.encoder.preprocess)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    val_gallery = data.gallery_keys(val_set)
    keys = list(dict.fromkeys(data.gallery_keys(train_set) + val_gallery))
    pixels, row_of, failures = PixelCache(cache_dir, pil_transform).load(
        {k: data.image_paths[k] for k in keys}, cfg.progress)
    for reason in list(failures.values())[:10]:
        log.warning("image left out: %s", reason)
    readable = [t for t in train_set if t.reference in row_of and t.target in row_of]
    if not readable:  # e.g. Git LFS pointers checked out in place of the images
        raise ValueError(f"none of the {len(train_set)} training pairs has a reference and a target "
                         f"image that can be read ({len(failures)} images failed; first: "
                         f"{next(iter(failures.values()), 'none')})")
    train_set = readable
    val_set = rankable_triplets(val_set, row_of)
    val_gallery = [k for k in val_gallery if k in row_of]

    # Every caption tokenised once.
    texts = list(dict.fromkeys(c for t in train_set for c in t.captions))
    text_row = {text: i for i, text in enumerate(texts)}
    samples = [(row_of[t.reference], row_of[t.target], [text_row[c] for c in t.captions],
                [row_of[k] for k in (t.img_set or [])
                 if k in row_of and k not in (t.reference, t.target)])
               for t in train_set]
    batches = _Batches(samples, cfg.batch_size, cfg.seed, group_by_reference=cfg.hard_negatives,
                       set_negatives=cfg.set_negatives)
    if len(batches) == 0:
        raise ValueError("too few training triplets for one batch")

    overlong = overlong_captions(model.encoder, texts)
    if overlong:
        first = overlong[0]
        log.warning("%d training caption%s over the text encoder's %d tokens: it reads only the first %d "
                    "(first: %r, %d tokens); shorten them (a store's captions in the review app)", len(overlong),
                    " is" if len(overlong) == 1 else "s are", model.encoder.context_length,
                    model.encoder.context_length, first if len(first) <= 120 else first[:117] + "...",
                    model.encoder.count_tokens(first))

    frozen = None
    if cfg.freeze_encoders:
        model.encoder.requires_grad_(False)
        frozen = _FrozenFeatures(model, cache_dir, pixels, row_of, texts, cfg.progress)
    else:
        token_ids = model.encoder.tokenize(texts)
        mirrored_ids = model.encoder.tokenize([mirror_text(t) for t in texts]) if cfg.mirror else None
        flip_rng = random.Random(cfg.seed * 7919 + 1)

    scratch = model_config["init"] == "random"
    # From scratch the fusion head learns at 4x the encoders' 5e-4: on the demo world
    # (6 epochs, batch 32) test R@1 14.0 -> 21.2, Rs@1 26.7 -> 35.9 against one rate.
    end_to_end_scratch = scratch and not cfg.freeze_encoders
    lr = cfg.lr or (2e-3 if end_to_end_scratch else 5e-4 if scratch or cfg.freeze_encoders else 1e-4)
    encoder_scale = (cfg.encoder_lr_scale if cfg.encoder_lr_scale is not None else
                     0.25 if end_to_end_scratch else 1.0 if scratch else 0.1)
    groups = _param_groups(model, lr, encoder_scale, cfg.weight_decay)
    if not groups:
        raise ValueError(f"nothing to train: fusion {cfg.fusion!r} has no weights and the encoders are frozen")
    try:  # the fused CPU kernel is ~4x cheaper per step (the token embedding is 6M weights)
        optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-6, fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-6)

    history: dict[str, Any] = {"loss": [], "epochs": [], "config": model_config}
    # -inf, not a low score: without validation pairs an epoch scores minus its loss
    # (InfoNCE, above 1), and best.pt was never written; the re-ranker then found no best.pt.
    best: dict[str, Any] = {"score": float("-inf")}
    epoch, step, elapsed_before, triplets_seen, train_seconds_before = 0, 0, 0.0, 0, 0.0
    if resume_state:
        fresh_base_lrs = [group["base_lr"] for group in optimizer.param_groups]  # from this cfg
        optimizer.load_state_dict(resume_state["optimizer"])
        epoch, step = resume_state["epoch"], resume_state["step"]
        elapsed_before = resume_state["elapsed"]
        history, best = resume_state["history"], resume_state["best"]
        triplets_seen = resume_state.get("triplets_seen", 0)
        train_seconds_before = resume_state.get("train_seconds", 0.0)
        _resume_learning_rate(optimizer, fresh_base_lrs, cfg, history, epoch, step)
        history["config"] = model_config

    from .train_rerank import QUERIES_PER_STEP, train_pair_scorer

    use_rerank = cfg.rerank and len(train_set) >= QUERIES_PER_STEP
    rerank_depth = cfg.rerank_top_k if use_rerank else 0
    if resume_state:
        best = _best_on_resume(resume_state, best, history, cfg, val_fingerprint, rerank_depth)
    budget = cfg.minutes * 60.0 if cfg.minutes is not None else None
    if budget is not None and use_rerank:  # a re-ranker skipped leaves its share to the fusion model
        budget *= 1.0 - cfg.rerank_share
    total_steps = cfg.epochs * len(batches) if cfg.epochs is not None else None
    setup_seconds = time.monotonic() - started
    loop_start = time.monotonic()
    val_seconds = 0.0
    train_seconds = train_seconds_before  # with triplets_seen: the throughput of all runs

    def elapsed() -> float:
        # The minutes budget covers everything, data preparation included.
        return elapsed_before + (time.monotonic() - loop_start) + (setup_seconds if not resume_state else 0.0)

    def fraction() -> float:
        if budget is not None:
            return elapsed() / budget
        return step / max(total_steps, 1)

    def out_of_budget() -> bool:
        if budget is not None:
            return elapsed() + val_seconds >= budget  # keep room for the last validation
        return step >= total_steps

    bar = tqdm(total=(int(budget) if budget else total_steps), disable=not cfg.progress,
               unit="s" if budget else "step", desc=f"training {cfg.fusion}")
    done = out_of_budget()
    if done and not resume_state:
        # Data preparation (decoding a large dataset's images) spent the fusion model's share
        # of --minutes: zero epochs left no best.pt, and the re-ranker stopped on its absence.
        # One step still makes a model; the decoded images are cached for the next run.
        log.warning("the --minutes budget was spent before training began (preparing the data took %.1f s of "
                    "the fusion model's %.1f s): it trains one step only; raise --minutes (the decoded images "
                    "are cached now, so a rerun starts sooner)", setup_seconds, budget or 0.0)
        done = False
    while not done:
        model.train()
        epoch_loss, epoch_steps = 0.0, 0
        for ref_rows, tgt_rows, text_rows, neg_rows in batches.epoch(epoch):
            t0 = time.monotonic()
            factor = lr_factor(fraction(), cfg.warmup, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            if frozen is not None:
                queries, targets, references, negatives, text_pooled = frozen.batch(
                    model, ref_rows, tgt_rows, text_rows, neg_rows)
            else:
                flip = mirrored_ids is not None and flip_rng.random() < 0.5
                queries, targets, references, negatives, text_pooled = _full_batch(
                    model, pixels, mirrored_ids if flip else token_ids, ref_rows, tgt_rows,
                    text_rows, neg_rows, flip=flip)
            if cfg.hard_negatives:
                loss = info_nce(queries, targets, target_ids=tgt_rows,
                                extra_negatives=torch.cat([references, negatives]),
                                extra_ids=torch.cat([ref_rows, neg_rows]))
            else:
                loss = info_nce(queries, targets, target_ids=tgt_rows)
            if cfg.delta_loss and frozen is None:
                loss = loss + cfg.delta_loss * info_nce(
                    F.normalize(text_pooled, dim=-1), F.normalize(targets - references, dim=-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            step += 1
            epoch_steps += 1
            triplets_seen += len(ref_rows)
            epoch_loss += loss.item()
            train_seconds += time.monotonic() - t0
            history["loss"].append([step, round(loss.item(), 5)])
            show_step(bar, budget, elapsed(), epoch, loss.item())
            if out_of_budget():
                done = True
                break
        epoch += 1
        if cfg.epochs is not None and epoch >= cfg.epochs:
            done = True
        t0 = time.monotonic()
        val = validate(model, pixels, row_of, val_gallery, val_set, cfg.val_queries) if val_set else {}
        val_seconds = time.monotonic() - t0
        record = {"epoch": epoch, "step": step, "loss": epoch_loss / max(epoch_steps, 1),
                  "seconds": round(elapsed(), 1),
                  # CPU seconds of this process: on a shared machine, wall time / threads
                  # would overstate what an idle machine needs.
                  "cpu_seconds": round(time.process_time() - cpu_started, 1), "val": val}
        history["epochs"].append(record)
        val_score = selection_score(val, rerank_depth, fallback=-epoch_loss / max(epoch_steps, 1))
        if val_score > best["score"]:
            best = {"score": val_score, "epoch": epoch, "val": val}
            save_weights(out / BEST_FILE, model, {"epoch": epoch, "val": val})
        save_weights(out / LAST_FILE, model, {
            "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step,
            "elapsed": elapsed(), "history": history, "best": best, "val": val,
            "triplets_seen": triplets_seen, "train_seconds": train_seconds, "val_fingerprint": val_fingerprint,
            "selection_depth": rerank_depth,
        })
        if on_epoch:
            on_epoch(record)
        # One line per epoch on stderr, also when no progress bar is shown (make demo logs).
        print(f"epoch {epoch}: loss {record['loss']:.3f}, {record['seconds']:.0f} s"
              f" ({record['cpu_seconds']:.0f} CPU s)" + val_brief(val), file=sys.stderr, flush=True)
        if not done:
            done = out_of_budget()
    bar.close()
    if cfg.rerank and not use_rerank:
        log.warning("re-ranker skipped: %d training pairs, it needs at least %d%s", len(train_set),
                    QUERIES_PER_STEP, " (the fusion model had all of --minutes)" if budget else "")
    if use_rerank:
        model.load_state_dict(torch.load(str(out / BEST_FILE), map_location="cpu",
                                         weights_only=False)["model"])
        first_seconds = elapsed()
        rerank = train_pair_scorer(
            model, pixels, row_of, train_set, val_set, val_gallery, out,
            seconds=cfg.minutes * 60.0 - first_seconds if cfg.minutes is not None else None,
            epochs=None if cfg.minutes is not None else (cfg.rerank_epochs or cfg.epochs),
            seed=cfg.seed, top_k=cfg.rerank_top_k, val_queries=cfg.val_queries, mirror=cfg.mirror,
            progress=cfg.progress)
        history["rerank"] = {**rerank.history, "enabled": rerank.enabled, "best": rerank.best,
                             "seconds": round(elapsed() - first_seconds, 1)}
        if rerank.enabled:
            best = {**best, "first_stage": {"epoch": best.get("epoch"), "val": best.get("val")},
                    "score": rerank.best["score"], "val": rerank.best["val"],
                    "rerank_epoch": rerank.best["epoch"],
                    "rerank_averaged_epochs": rerank.best.get("averaged_epochs")}
    seconds = elapsed()
    history["summary"] = {
        "epochs": epoch, "steps": step, "seconds": round(seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        "threads": torch.get_num_threads(), "device": describe(device),
        "triplets_per_second": round(triplets_seen / train_seconds, 1) if train_seconds > 0 else 0.0,
        "train_triplets": len(train_set), "val_triplets": len(val_set), "best": best,
    }
    (out / "history.json").write_text(json.dumps(history, indent=1))
    plot_history(history, out / "curves.png")
    return TrainResult(out=out, epochs=epoch, steps=step, seconds=seconds,
                       triplets_per_second=history["summary"]["triplets_per_second"],
                       best=best, history=history)


def overlong_captions(encoder, texts: list[str]) -> list[str]:
    """The captions longer than the text encoder's context (77 CLIP tokens), which its
    tokenizer cuts: stage 4 keeps its compounds under it, a reviewer's edit may not."""
    if not texts:
        return []
    filled = (encoder.tokenize(texts)[:, -1] != 0).nonzero().flatten().tolist()  # cut, or exactly full
    return [texts[i] for i in filled if encoder.count_tokens(texts[i]) > encoder.context_length]


def _resume_learning_rate(optimizer, fresh_base_lrs: list[float], cfg: TrainConfig, history: dict[str, Any],
                          epoch: int, step: int) -> None:
    """An explicit --lr on resume wins over the one in last.pt (loading the optimiser's
    state brings back the saved peak rates); without it the run's own rate carries on.
    The warm-up + cosine factor still follows the run's elapsed budget, so the new peak
    rate is scaled from where the schedule already is. history['resumes'] records each."""
    previous = [group["base_lr"] for group in optimizer.param_groups]
    if cfg.lr is not None:
        for group, fresh in zip(optimizer.param_groups, fresh_base_lrs):
            group["base_lr"] = fresh
    now = [group["base_lr"] for group in optimizer.param_groups]
    history.setdefault("resumes", []).append({
        "epoch": epoch, "step": step, "lr": cfg.lr, "lr_from": "--lr" if cfg.lr is not None else "checkpoint",
        "previous_base_lrs": previous, "base_lrs": now,
    })
    if now != previous:
        print(f"resume: --lr {cfg.lr:g} replaces the run's learning rate (peak rates of the parameter "
              f"groups {_rates(previous)} -> {_rates(now)}); the warm-up + cosine schedule continues "
              f"from step {step}", file=sys.stderr, flush=True)


def _rates(values: list[float]) -> str:
    return "/".join(f"{v:g}" for v in dict.fromkeys(values))


def _best_on_resume(state: dict[str, Any], best: dict[str, Any], history: dict[str, Any], cfg: TrainConfig,
                    val_fingerprint: str, rerank_depth: int) -> dict[str, Any]:
    """The saved best, or none where its score does not compare with this run's: other
    validation pairs, or another measure (`selection_score`: R@1, or recall at the
    re-ranker's depth). Each resume's data and verdict go into history['resumes']."""
    val_changed = state.get("val_fingerprint") not in (None, val_fingerprint)
    selection_changed = state.get("selection_depth") not in (None, rerank_depth)
    history["resumes"][-1].update({"dbs": list(cfg.dbs), "files": list(cfg.files), "source": cfg.source,
                                   "captions": cfg.captions, "validation_changed": val_changed,
                                   "selection_changed": selection_changed})
    if not (val_changed or selection_changed):
        return best
    why = ("the validation pairs differ from the saved run's (another --db/--data, --source or --captions, "
           "or reviews since)" if val_changed else
           "the saved run picked best.pt by " + ("R@1" if not state.get("selection_depth") else
                                                  "recall at the re-ranker's depth")
           + ", this one by " + ("recall at the re-ranker's depth" if rerank_depth else "R@1 (no re-ranker)"))
    print(f"resume: {why}: best.pt is picked afresh from the epochs of this run", file=sys.stderr, flush=True)
    return {"score": float("-inf")}


def _triplets_fingerprint(triplets) -> str:
    """A hash of what the triplets ask (images and captions), whatever their order."""
    rows = sorted(json.dumps([t.reference, t.target, sorted(t.captions)]) for t in triplets)
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def _check_budget_left(cfg: TrainConfig, out: Path, state: dict[str, Any]) -> None:
    """Refuse a resume that would train nothing: the saved run's first stage already
    spent the --epochs or --minutes asked for, and there is no re-ranker stage left to
    finish (re-ranking off, the run ended, or no minutes left for it). Before, such a
    resume deleted rerank.pt and reported the throughput of zero steps."""
    epochs, seconds = state["epoch"], state["elapsed"]
    if cfg.epochs is not None and epochs >= cfg.epochs:
        asked = f"--epochs {cfg.epochs}"
    elif cfg.minutes is not None and seconds >= cfg.minutes * 60.0 * (1.0 - cfg.rerank_share if cfg.rerank else 1.0):
        asked = f"--minutes {cfg.minutes:g}" + (f" ({1.0 - cfg.rerank_share:.0%} of it for the fusion model, "
                                                "the rest for the re-ranker)" if cfg.rerank else "")
    else:
        return
    minutes_left = cfg.minutes is None or seconds < cfg.minutes * 60.0
    if cfg.rerank and minutes_left and not _run_finished(out, state):
        return  # stopped during the re-ranker's stage: the resume trains it
    raise ValueError(f"nothing to resume: {out} has trained {epochs} epoch{'' if epochs == 1 else 's'} in {seconds:.0f} s, "
                     f"which already spends {asked}; raise it to train on")


def _run_finished(out: Path, state: dict[str, Any]) -> bool:
    """Whether the run that wrote this last.pt also finished (history.json is written
    last, with the same epoch and step)."""
    try:
        summary = json.loads((out / "history.json").read_text()).get("summary") or {}
    except (OSError, ValueError):
        return False
    return summary.get("epochs") == state["epoch"] and summary.get("steps") == state["step"]


def _full_batch(model: ComposedRetriever, pixels, token_ids, ref_rows, tgt_rows, text_rows,
                neg_rows, flip: bool = False):
    """Queries, targets, the references' and the image-set negatives' embeddings of one
    batch, encoders in the graph. All images share one pass through the vision tower."""
    n = len(ref_rows)
    images = model.normalize_pixels(pixels[torch.cat([ref_rows, tgt_rows, neg_rows])])
    if flip:
        images = images.flip(-1)
    encoded = model.encoder.encode_image_tokens(images)
    pooled, tokens = encoded.pooled, encoded.tokens
    text = model.encoder.encode_text_ids(token_ids[text_rows])
    queries = model.query_from_features(ImageTokens(pooled[:n], tokens[:n]), text)
    pooled = F.normalize(pooled, dim=-1)
    return queries, pooled[n:2 * n], pooled[:n], pooled[2 * n:], text.pooled


class _FrozenFeatures:
    """Cached frozen-encoder features, held in memory as float16 for the whole run."""

    def __init__(self, model: ComposedRetriever, cache_dir: Path, pixels, row_of, texts, progress: bool):
        cache = FeatureCache(cache_dir, model.encoder)
        # Image content hashes, in pixel-tensor row order: the cache's keys.
        content_keys = [None] * len(pixels)
        for key, row in row_of.items():
            content_keys[row] = key
        row_by_key = {key: row for row, key in enumerate(content_keys)}

        def pixels_of(batch_keys):
            rows = torch.tensor([row_by_key[k] for k in batch_keys])
            return model.normalize_pixels(pixels[rows])

        model.encoder.eval()
        image = cache.image_features(content_keys, pixels_of, progress)
        text = cache.text_features(texts, progress)
        self.device = device_of(model)
        features = {"image_pooled": image["pooled"], "image_tokens": image["tokens"],
                    "text_pooled": text["pooled"], "text_tokens": text["tokens"],
                    "text_mask": text["padding_mask"]}
        # On a GPU with room for them, the features move once and each step only gathers
        # rows there; otherwise (a large gallery) each step moves its own rows.
        size = sum(t.numel() * t.element_size() for t in features.values())
        if self.device.type == "cuda" and size < torch.cuda.mem_get_info(self.device)[0] // 4:
            features = {name: t.to(self.device) for name, t in features.items()}
        for name, tensor in features.items():
            setattr(self, name, tensor)

    def _rows(self, features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return features[rows].to(self.device, non_blocking=True)

    def batch(self, model, ref_rows, tgt_rows, text_rows, neg_rows):
        tokens, mask = trim_text_features(self._rows(self.text_tokens, text_rows),
                                          self._rows(self.text_mask, text_rows))
        image = ImageTokens(self._rows(self.image_pooled, ref_rows).float(),
                            self._rows(self.image_tokens, ref_rows).float())
        text = TextTokens(self._rows(self.text_pooled, text_rows).float(), tokens.float(), mask)
        queries = model.query_from_features(image, text)
        def gallery(rows):
            return F.normalize(self._rows(self.image_pooled, rows).float(), dim=-1)
        return queries, gallery(tgt_rows), gallery(ref_rows), gallery(neg_rows), text.pooled


def selection_score(val: dict[str, Any], rerank_depth: int, fallback: float) -> float:
    """What picks `best.pt`: validation Recall@1, or, when a re-ranker re-scores the top
    `rerank_depth`, recall at the deepest validated k within that depth (Recall@1 breaks
    ties), since the re-ranker can only find targets the first stage ranks that high.

    Demo world (one run, the same re-ranker on both): the R@1-best epoch 3 had val R@50
    93.5, epoch 8 had 96.8; re-ranked test R@1 63.1 -> 64.0, R@5 95.2 -> 96.4."""
    recall = val.get("recall") or {}
    if "1" not in recall:
        return fallback
    depths = [int(k) for k in recall if int(k) <= rerank_depth]
    if depths:
        return float(recall[str(max(depths))]) + float(recall["1"]) / 1000.0
    return float(recall["1"])


@torch.no_grad()
def validate(model, pixels, row_of, gallery_keys, triplets, max_queries: int) -> dict[str, Any]:
    queries = build_queries(triplets, max_queries=max_queries)
    emb = embed(model, pixels, row_of, gallery_keys, queries, baselines=False)
    result = evaluate_embeddings(emb, gallery_keys, queries)
    result.pop("baselines", None)
    return result


def plot_history(history: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = draw_history(history)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_history(history: dict[str, Any]):
    """curves.png's figure: the fusion model's loss and validation, then the re-ranker's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rerank = history.get("rerank")
    # Legends go in a row of their own under the panels: inside (lower right) they covered
    # the R@1 and R_subset@1 curves and the re-ranker's fusion-alone lines and loss.
    panels, legend_height = (3 if rerank else 2), 1.0
    fig, grid = plt.subplots(2, panels, figsize=(5 * panels, 3.8 + legend_height), squeeze=False,
                             height_ratios=[3.6, legend_height], layout="constrained")
    axes, legend_axes = grid
    for legend_ax in legend_axes:
        legend_ax.set_axis_off()
    ax_loss, ax_val = axes[0], axes[1]
    if history["loss"]:
        steps, losses = np.array(history["loss"]).T
        window = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax_loss.plot(steps, losses, alpha=0.25, color="tab:blue")
        ax_loss.plot(steps[window - 1:], smooth, color="tab:blue")
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("InfoNCE loss")
    ax_loss.set_title("training loss")
    epochs = [e for e in history["epochs"] if e.get("val")]
    # What picks best.pt (`selection_score`): R@1, or with a re-ranker the recall at its depth.
    depth = int((history.get("config") or {}).get("training", {}).get("rerank_top_k") or 0) if rerank else 0
    validated = [int(k) for k in (epochs[0]["val"].get("recall") or {})] if epochs else []
    picking = str(max([k for k in validated if k <= depth], default=1))
    curves = [("recall", "1", "R@1"), ("recall", "5", "R@5"), ("recall_subset", "1", "R_subset@1")]
    if picking not in ("1", "5"):
        curves.append(("recall", picking, f"R@{picking} (picks best.pt)"))
    for metric, k, label in curves:
        values = [e["val"].get(metric, {}).get(k) for e in epochs]
        if any(v is not None for v in values):
            ax_val.plot([e["epoch"] for e in epochs], values, marker="o", label=label)
    best = (history.get("summary") or {}).get("best") or {}
    best_epoch = (best.get("first_stage") or best).get("epoch")
    chosen = next((e for e in epochs if e["epoch"] == best_epoch), None)
    if chosen is not None and chosen["val"].get("recall", {}).get(picking) is not None:
        ax_val.scatter([best_epoch], [chosen["val"]["recall"][picking]], marker="*", s=160, color="black",
                       zorder=3, label=f"best.pt: epoch {best_epoch}")
    ax_val.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_val.set_xlabel("epoch")
    ax_val.set_ylabel("percent")
    ax_val.set_title("validation")
    ax_val.set_ylim(0, 100)
    if epochs:
        _legend_below(legend_axes[1], [ax_val])
    if rerank:
        _plot_rerank(axes[2], rerank, legend_axes[2])
    return fig


def _legend_below(legend_ax, axes) -> None:
    """The legend of `axes` (a panel and its twin) in the empty axes under them."""
    handles, labels = [], []
    for ax in axes:
        h, lab = ax.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    if handles:
        legend_ax.legend(handles, labels, loc="upper center", fontsize=8, ncols=2 if len(handles) > 4 else 1)


def _plot_rerank(ax, rerank: dict[str, Any], legend_ax) -> None:
    """The re-ranker's validation per epoch against the fixed first stage's."""
    epochs = [e for e in rerank["epochs"] if e.get("val")]
    first = rerank.get("first_stage_val") or {}
    for (metric, k, label), colour in zip((("recall", "1", "R@1"), ("recall_subset", "1", "R_subset@1")),
                                          ("tab:blue", "tab:green")):
        values = [e["val"].get(metric, {}).get(k) for e in epochs]
        if any(v is not None for v in values):
            ax.plot([e["epoch"] for e in epochs], values, marker="o", color=colour,
                    label=f"{label} re-ranked")
        if first.get(metric, {}).get(k) is not None:
            ax.axhline(first[metric][k], color=colour, linestyle="--", label=f"{label} fusion alone")
        kept = rerank.get("best") or {}
        if kept.get("averaged_epochs") and kept.get("val", {}).get(metric, {}).get(k) is not None:
            averaged = kept["averaged_epochs"]
            ax.scatter([averaged[-1]], [kept["val"][metric][k]], marker="*", s=140, color=colour, zorder=3,
                       label=f"{label} saved: epochs {averaged[0]}-{averaged[-1]} averaged")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("re-ranker epoch")
    ax.set_ylabel("percent")
    ax.set_title("validation, re-ranker" + ("" if rerank.get("enabled") else " (not used)"))
    ax.set_ylim(0, 100)
    twins = [ax]
    trained = [e for e in rerank["epochs"] if e.get("loss") is not None]
    if trained:  # its own loss, on its own scale: is it still learning when time runs out?
        loss_ax = ax.twinx()
        loss_ax.plot([e["epoch"] for e in trained], [e["loss"] for e in trained], color="grey",
                     linestyle=":", label="re-ranker loss")
        loss_ax.set_ylabel("re-ranker loss")
        ax.set_zorder(loss_ax.get_zorder() + 1)  # the recall curves above the loss line
        ax.patch.set_visible(False)
        twins.append(loss_ax)
    if epochs or first:
        _legend_below(legend_ax, twins)

