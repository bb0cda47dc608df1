"""The composed-retrieval model, its checkpoints, and `Retriever`, the inference API.

A checkpoint directory holds `config.json` (how to rebuild the model), `best.pt` and
`last.pt` (weights; `last.pt` also the optimiser state for resuming), and for an
hf-hub: encoder `open_clip_config.json` (its architecture and preprocessing, as the
repository's file has them). `load_retriever` rebuilds the model without downloading
anything: the encoder weights are inside, and so is any architecture open_clip lacks.

    retriever = load_retriever("demo/model")
    gallery = retriever.encode_images(pil_images)          # (N, D) float32, unit norm
    queries = retriever.encode_queries(pil_images, texts)   # same space
    scores = queries @ gallery.T
"""

from __future__ import annotations

import functools
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T

from .device import device_of, resolve_device
from .encoders import Encoder, create_encoder
from .fusion import create_fusion

CONFIG_FILE = "config.json"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
BEST_FILE = "best.pt"
LAST_FILE = "last.pt"
DECODED_CACHE_BYTES = 256 << 20  # decoded re-ranking candidates a Retriever keeps


def split_preprocess(preprocess) -> tuple[T.Compose, tuple, tuple]:
    """Split open_clip's eval transform into its PIL part (resize, crop, RGB) and the
    normalisation, so images can be decoded once into a uint8 cache and normalised in
    torch, giving exactly what the full transform gives."""
    steps = list(preprocess.transforms)
    normalize = next((s for s in steps if isinstance(s, T.Normalize)), None)
    if normalize is None:
        raise ValueError("the model's preprocessing has no Normalize step")
    pil_steps = []
    for step in steps:
        if isinstance(step, T.Normalize) or "ToTensor" in type(step).__name__:
            continue
        pil_steps.append(step)
    return T.Compose(pil_steps), tuple(normalize.mean), tuple(normalize.std)


class ComposedRetriever(nn.Module):
    """Encoder + fusion head. Queries: (reference image, text); targets: images."""

    def __init__(self, encoder: Encoder, fusion: str = "residual", width: Optional[int] = None,
                 heads: int = 8, layers: int = 4):
        super().__init__()
        self.encoder = encoder
        self.fusion_name = fusion
        # The fusion width follows the embedding size: 128 for tiny, 512 for ViT-B-32.
        self.fusion = create_fusion(
            fusion, encoder.vision_width, encoder.text_width, encoder.embed_dim,
            width=width or encoder.embed_dim, heads=heads, layers=layers,
        )
        _, mean, std = split_preprocess(encoder.preprocess)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalize_pixels(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 from the decode cache (on the CPU) -> the encoder's input,
        on the model's device."""
        images = images_uint8.to(self.pixel_mean.device, non_blocking=True)
        return normalize_uint8(images, self.pixel_mean, self.pixel_std)

    def cpu_normalizer(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """`normalize_pixels` that stays on the CPU, for data-loader workers (which must
        not touch a GPU) to hand over ready inputs."""
        return functools.partial(normalize_uint8, mean=self.pixel_mean.cpu(), std=self.pixel_std.cpu())

    def target_embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode_image(pixels)

    def query_embedding(self, pixels: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        image = self.encoder.encode_image_tokens(pixels)
        text = self.encoder.encode_text_ids(text_ids)
        return F.normalize(self.fusion(image, text), dim=-1)

    def query_from_features(self, image, text) -> torch.Tensor:
        """Frozen-encoder mode: the fusion head on cached ImageTokens / TextTokens."""
        return F.normalize(self.fusion(image, text), dim=-1)


def normalize_uint8(images_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (images_uint8.float() / 255.0 - mean) / std


def build_model(config: dict[str, Any], pretrained: Optional[str] = None,
                checkpoint: Optional[str] = None, hub_weights: bool = True,
                open_clip_config: Optional[dict[str, Any]] = None) -> ComposedRetriever:
    """The model of `config`; `hub_weights` false builds an hf-hub: model's architecture
    without loading its repository's weights (the caller loads its own), and with
    `open_clip_config` (`read_open_clip_config`) without asking the Hub at all."""
    encoder = create_encoder(
        config.get("model", "tiny"), pretrained=pretrained, checkpoint=checkpoint,
        image_size=config.get("image_size"), hub_weights=hub_weights,
        open_clip_config=open_clip_config,
    )
    return ComposedRetriever(
        encoder, fusion=config.get("fusion", "residual"), width=config.get("fusion_width"),
        heads=config.get("fusion_heads", 8), layers=config.get("fusion_layers", 4),
    )


def save_weights(path: Path, model: ComposedRetriever, extra: Optional[dict] = None) -> None:
    """Write atomically: a killed run never leaves a half-written checkpoint."""
    payload = {"model": model.state_dict()}
    if extra:
        payload.update(extra)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, str(tmp))
    tmp.replace(path)


def write_config(checkpoint_dir: Path, config: dict[str, Any]) -> None:
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    (checkpoint_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))


def write_open_clip_config(checkpoint_dir: Path, encoder: Encoder) -> None:
    """Store the encoder's open_clip config where it has one (hf-hub: models), so the
    checkpoint rebuilds without the Hub; remove a stale one of an earlier run."""
    path = Path(checkpoint_dir) / OPEN_CLIP_CONFIG_FILE
    if encoder.open_clip_config is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(json.dumps(encoder.open_clip_config, indent=2, sort_keys=True))


def read_open_clip_config(checkpoint_dir: Path) -> Optional[dict[str, Any]]:
    """The checkpoint's stored open_clip config; None for a checkpoint without one
    (not an hf-hub: model, or trained before it was stored: rebuilt through the Hub)."""
    path = Path(checkpoint_dir) / OPEN_CLIP_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); delete it to rebuild the model "
                         "through the Hugging Face Hub, or retrain") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise ValueError(f"{path} holds no open_clip model_cfg; delete it to rebuild the model "
                         "through the Hugging Face Hub, or retrain")
    return config


def read_config(checkpoint_dir: Path) -> dict[str, Any]:
    path = Path(checkpoint_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{checkpoint_dir} is not a good4cir checkpoint directory (no {CONFIG_FILE}); "
            "train one with `good4cir train --out DIR`"
        )
    try:
        return json.loads(path.read_text())
    except ValueError as exc:  # cut short or edited by hand
        raise ValueError(f"{path} is not valid JSON ({exc}); retrain into a fresh --out") from None


def load_model(checkpoint_dir: str | Path, which: str = "best",
               device: str | torch.device | None = None) -> tuple[ComposedRetriever, dict]:
    """Rebuild the model of a checkpoint directory; `which` is best or last; `device` as
    `--device` takes it (`retrieval.device`), the CPU when None."""
    checkpoint_dir = Path(checkpoint_dir)
    config = read_config(checkpoint_dir)
    path = checkpoint_dir / (BEST_FILE if which == "best" else LAST_FILE)
    if not path.is_file():
        other = checkpoint_dir / (LAST_FILE if which == "best" else BEST_FILE)
        if not other.is_file():
            raise FileNotFoundError(f"{checkpoint_dir} holds no weights ({BEST_FILE} or {LAST_FILE})")
        path = other
    # The weights come from `path`; an hf-hub: architecture from the checkpoint too.
    model = build_model(config, hub_weights=False, open_clip_config=read_open_clip_config(checkpoint_dir))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=False)
    except (PermissionError, IsADirectoryError):
        raise
    except Exception as exc:  # truncated or not a checkpoint (torch says OSError, RuntimeError, ...)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise ValueError(f"{path} cannot be read as model weights ({reason}); "
                         f"try --which {'last' if which == 'best' else 'best'}, or retrain") from None
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} holds no model weights (not written by good4cir train)")
    model.load_state_dict(state["model"])
    model.to(device if isinstance(device, torch.device) else resolve_device(device or "cpu"))
    model.eval()
    info = {k: v for k, v in state.items() if k not in ("model", "optimizer", "scheduler")}
    return model, {**config, "weights": str(path), **info}


class Retriever:
    """Inference over a trained checkpoint: gallery and query embeddings, same space."""

    def __init__(self, model: ComposedRetriever, model_info: dict[str, Any], batch_size: int = 64,
                 pair_scorer=None, rerank_top_k: int = 0):
        self.model = model.eval()
        self.device = device_of(model)
        self.model_info = model_info
        self.batch_size = batch_size
        self.image_transform = model.encoder.preprocess
        # The second stage (retrieval.rerank), where the checkpoint has a trained one.
        self.pair_scorer = pair_scorer.eval() if pair_scorer is not None else None
        self.rerank_top_k = rerank_top_k if pair_scorer is not None else 0
        self._pil_transform = split_preprocess(self.image_transform)[0]
        # Decoded candidates for the re-ranker, by (path, mtime): the Retrieve tab asks
        # about the same gallery images again and again, and decoding is most of a query.
        self._decoded: "OrderedDict[tuple[str, int], np.ndarray]" = OrderedDict()
        self._decoded_bytes = 0

    @property
    def embed_dim(self) -> int:
        return self.model.encoder.embed_dim

    def _pixels(self, images: Sequence) -> torch.Tensor:
        return torch.stack([self.image_transform(_as_pil(im)) for im in images]).to(self.device)

    def _batches(self, n: int) -> Iterable[slice]:
        for start in range(0, n, self.batch_size):
            yield slice(start, min(start + self.batch_size, n))

    @torch.no_grad()
    def encode_images(self, images: Sequence) -> np.ndarray:
        """PIL images -> (N, D) float32, L2-normalised target/gallery embeddings."""
        out = [self.model.target_embedding(self._pixels(images[s])) for s in self._batches(len(images))]
        return _to_numpy(out, self.embed_dim)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Already preprocessed (N, 3, H, W) float tensors -> gallery embeddings."""
        out = [self.model.target_embedding(pixels[s].to(self.device)) for s in self._batches(len(pixels))]
        return _to_numpy(out, self.embed_dim)

    @torch.no_grad()
    def encode_queries(self, images: Sequence, texts: Sequence[str]) -> np.ndarray:
        """(reference image, modification text) pairs -> (N, D) float32, L2-normalised."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        out = []
        for s in self._batches(len(images)):
            ids = self.model.encoder.tokenize(list(texts[s]))
            out.append(self.model.query_embedding(self._pixels(images[s]), ids))
        return _to_numpy(out, self.embed_dim)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Text-only embeddings (the text-only baseline), same space as images."""
        out = [self.model.encoder.encode_text(self.model.encoder.tokenize(list(texts[s])))
               for s in self._batches(len(texts))]
        return _to_numpy(out, self.embed_dim)


    def uint8_pixels(self, images: Sequence) -> torch.Tensor:
        """PIL images or paths -> (N, 3, H, W) uint8 at the model's input size, exactly
        what the decode cache holds for the same files. Paths are decoded once (a file
        that cannot be read raises store.ImageError)."""
        arrays = [self._decoded_file(im) if isinstance(im, (str, Path)) else self._decode(im)
                  for im in images]
        return torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))

    def _decode(self, image) -> np.ndarray:
        return np.ascontiguousarray(
            np.asarray(self._pil_transform(_as_pil(image)), dtype=np.uint8).transpose(2, 0, 1))

    def _decoded_file(self, path) -> np.ndarray:
        try:
            key = (str(path), os.stat(path).st_mtime_ns)
        except OSError:
            key = None  # _decode names the missing file
        if key is not None and key in self._decoded:
            self._decoded.move_to_end(key)
            return self._decoded[key]
        array = self._decode(path)
        if key is not None:
            self._decoded[key] = array
            self._decoded_bytes += array.nbytes
            while self._decoded_bytes > DECODED_CACHE_BYTES and self._decoded:
                self._decoded_bytes -= self._decoded.popitem(last=False)[1].nbytes
        return array

    @torch.no_grad()
    def rerank_scores(self, reference, text: str, candidates: Sequence) -> np.ndarray:
        """The pair scorer's score of each candidate (PIL image or path) for one query."""
        if self.pair_scorer is None:
            raise ValueError("this checkpoint has no re-ranker")
        if not candidates:
            return np.zeros(0, dtype=np.float32)
        ref = self.uint8_pixels([reference])
        cands = self.uint8_pixels(candidates)
        pairs = torch.cat([self.pair_scorer.encode_pair_views(ref.expand(len(cands[s]), -1, -1, -1), cands[s])
                           for s in self._batches(len(cands))], dim=1)
        text_emb = self.pair_scorer.encode_caption_views([text])[:, 0]
        return self.pair_scorer.score(pairs, text_emb).cpu().numpy().astype(np.float32)


def _as_pil(image):
    from PIL import Image

    if isinstance(image, (str, Path)):
        from store.images import load_image_rgb  # EXIF, CMYK, 16-bit, alpha handled once

        return load_image_rgb(image)
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    raise TypeError(f"expected a PIL image or a path, got {type(image).__name__}")


def _to_numpy(chunks: list[torch.Tensor], dim: int) -> np.ndarray:
    if not chunks:
        return np.zeros((0, dim), dtype=np.float32)
    return np.ascontiguousarray(torch.cat(chunks).float().cpu().numpy(), dtype=np.float32)


def load_retriever(checkpoint_dir: str | Path, which: str = "best", rerank: bool = True,
                   device: str | torch.device | None = None) -> Retriever:
    """The trained model of `good4cir train --out DIR`, ready for inference on `device`
    (the CPU when None), with its re-ranker where it has one (and `rerank`)."""
    from .rerank import load_pair_scorer

    model, info = load_model(checkpoint_dir, which=which, device=device)
    second = load_pair_scorer(checkpoint_dir, model.encoder) if rerank else None
    if second is None:
        return Retriever(model, info)
    scorer, rerank_info = second
    return Retriever(model, {**info, "rerank": rerank_info}, pair_scorer=scorer,
                     rerank_top_k=int(rerank_info["top_k"]))
