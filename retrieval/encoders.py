"""Image and text encoders through open_clip, exposing pooled embeddings and tokens.

The fusion model needs the reference image's patch tokens and the caption's text
tokens, which open_clip's `encode_image` / `encode_text` do not return; `Encoder`
runs the same towers and keeps both. Models come from open_clip's factory (its JSON
configs plus ours in `model_configs/`), preprocessing from the same factory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
# Short names accepted by --model; anything else is an open_clip model name.
MODEL_ALIASES = {"tiny": "g4c-tiny"}
# open_clip's form for a Hugging Face repository with open_clip_config.json and weights
# (hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K); huggingface_hub fetches and caches them.
HF_HUB_PREFIX = "hf-hub:"
# Names under which the architectures stored in checkpoints are registered with open_clip.
STORED_CONFIG_PREFIX = "g4c-stored-"

open_clip.add_model_config(MODEL_CONFIG_DIR)


def resolve_model_name(name: str) -> str:
    return MODEL_ALIASES.get(name, name)


def is_hub_model(name: str) -> bool:
    """Whether `name` is an open_clip hf-hub:ORG/REPO name (config and weights from the Hub)."""
    return name.startswith(HF_HUB_PREFIX)


def list_models() -> list[str]:
    """Every model name --model accepts (our configs first)."""
    ours = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))
    return list(MODEL_ALIASES) + ours + [m for m in open_clip.list_models()
                                         if m not in ours and not m.startswith(STORED_CONFIG_PREFIX)]


@dataclass
class TextTokens:
    pooled: torch.Tensor  # (B, embed_dim), projected, not normalised
    tokens: torch.Tensor  # (B, L, text_width)
    padding_mask: torch.Tensor  # (B, L) True where the position is padding


@dataclass
class ImageTokens:
    pooled: torch.Tensor  # (B, embed_dim), projected, not normalised
    tokens: torch.Tensor  # (B, P, vision_width) patch tokens, CLS excluded


class Encoder(nn.Module):
    """An open_clip CLIP model with token outputs, its tokenizer and preprocessing."""

    def __init__(self, clip: nn.Module, model_name: str, tokenizer, preprocess,
                 open_clip_config: Optional[dict[str, Any]] = None):
        super().__init__()
        # An hf-hub: model's architecture and preprocessing, as open_clip_config.json holds
        # them ({"model_cfg", "preprocess_cfg"}): what a checkpoint stores to rebuild it.
        self.open_clip_config = open_clip_config
        visual = getattr(clip, "visual", None)
        self.is_resnet = visual is not None and hasattr(visual, "attnpool") and hasattr(visual, "layer4")
        if visual is None or not (hasattr(visual, "output_tokens") or self.is_resnet):
            raise ValueError(f"model {model_name!r}: only open_clip ViT and ResNet models are supported")
        self.clip = clip
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        if not self.is_resnet:
            # Eager attribute; open_clip's VisionTransformer then returns (pooled, tokens).
            self.clip.visual.output_tokens = True

    # -- sizes -------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return _embed_dim_of(self.clip)

    @property
    def vision_width(self) -> int:
        if self.is_resnet:
            return int(self.clip.visual.attnpool.k_proj.in_features)
        return int(self.clip.visual.transformer.width)

    @property
    def text_width(self) -> int:
        return int(self.text_tower()["token_embedding"].embedding_dim)

    @property
    def image_size(self) -> int:
        size = self.clip.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def context_length(self) -> int:
        return int(self.text_tower()["positional_embedding"].shape[0])

    # -- text ------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def count_tokens(self, text: str) -> int:
        """How many tokens the text is, start and end tokens included, before `tokenize`
        cuts it at `context_length` (a byte-level BPE gives at most one token a byte)."""
        ids = self.tokenizer([text], context_length=len(text.encode()) + 2)
        return int((ids != 0).sum())

    def text_tower(self) -> dict[str, Any]:
        """The text tower's parts, for both CLIP and CustomTextCLIP layouts."""
        owner = getattr(self.clip, "text", None) or self.clip
        return {
            "token_embedding": owner.token_embedding,
            "positional_embedding": owner.positional_embedding,
            "transformer": owner.transformer,
            "ln_final": owner.ln_final,
            "text_projection": owner.text_projection,
            "attn_mask": owner.attn_mask,
        }

    def encode_text_ids(self, ids: torch.Tensor) -> TextTokens:
        """Run the text tower on token ids (B, context_length)."""
        return run_text_tower(self.text_tower(), ids)

    # -- images ------------------------------------------------------------------------
    def encode_image_tokens(self, pixels: torch.Tensor) -> ImageTokens:
        visual = self.clip.visual
        if self.is_resnet:
            # The last feature map's cells are the tokens; attention pooling as open_clip's.
            x = visual.stem(pixels)
            x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
            return ImageTokens(pooled=visual.attnpool(x), tokens=x.flatten(2).transpose(1, 2))
        pooled, tokens = visual(pixels)
        return ImageTokens(pooled=pooled, tokens=tokens)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled, L2-normalised image embeddings."""
        return F.normalize(self.encode_image_tokens(pixels).pooled, dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encode_text_ids(ids).pooled, dim=-1)



def run_text_tower(tower: dict[str, Any], ids: torch.Tensor) -> TextTokens:
    """An open_clip text tower (the parts `Encoder.text_tower` names) on token ids.

    The causal mask makes every position depend only on earlier ones, so trimming
    the batch to its longest caption gives the same outputs and saves most of the
    compute on short modification texts.
    """
    ids = ids.to(tower["token_embedding"].weight.device)
    lengths = (ids != 0).sum(dim=1)
    length = max(int(lengths.max().item()), 1)
    ids = ids[:, :length]
    x = tower["token_embedding"](ids)
    x = x + tower["positional_embedding"][:length].to(x.dtype)
    mask = tower["attn_mask"]
    if mask is not None:
        mask = mask[:length, :length]
    x = tower["transformer"](x, attn_mask=mask)
    x = tower["ln_final"](x)
    # CLIP pools at the end-of-text token, which has the largest id.
    pooled = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
    proj = tower["text_projection"]
    if proj is not None:
        pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
    return TextTokens(pooled=pooled, tokens=x, padding_mask=ids == 0)

def _embed_dim_of(clip: nn.Module) -> int:
    if hasattr(clip.visual, "attnpool"):
        return int(clip.visual.output_dim)
    proj = clip.visual.proj
    if proj is not None:
        return int(proj.shape[1])
    return int(clip.visual.transformer.width)


def create_encoder(
    model: str = "tiny",
    pretrained: Optional[str] = None,
    checkpoint: Optional[str | Path] = None,
    image_size: Optional[int] = None,
    hub_weights: bool = True,
    open_clip_config: Optional[dict[str, Any]] = None,
) -> Encoder:
    """Build an encoder: `model` is 'tiny', any open_clip name, or hf-hub:ORG/REPO.

    `pretrained` is an open_clip tag (downloaded by open_clip on the user's machine);
    `checkpoint` is a local file of open_clip weights (a state_dict, or a dict holding
    one under 'state_dict'). Neither: random init, as the demo and tests use. An
    hf-hub: model comes with its repository's weights (through huggingface_hub's cache;
    HF_HUB_OFFLINE=1 reads only that), unless `checkpoint` is given or `hub_weights` is
    false (a trained checkpoint's weights will replace them). `open_clip_config` (an
    hf-hub: encoder's `open_clip_config`, stored with a checkpoint) builds that model's
    architecture and preprocessing without the Hub, and without its weights.
    """
    # A weights file replaces the random init too: `train --checkpoint` said "initialized
    # randomly", read as the user's weights being ignored.
    follow = not hub_weights or checkpoint is not None
    with _trained_weights_follow() if follow else contextlib.nullcontext():
        return _create_encoder(model, pretrained, checkpoint, image_size, hub_weights, open_clip_config)


class _RandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


class _DownloadFailureLog(logging.Filter):
    # open_clip logs "Failed to download weights ..." and then raises the same text, which
    # our error quotes with what to do: the log line only printed the failure twice.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to download weights")


@contextlib.contextmanager
def _trained_weights_follow():
    """Drop open_clip's "No pretrained weights loaded ... Model initialized randomly"
    (logged on the root logger) while building an architecture whose trained weights the
    caller loads next: every eval, index and query printed it before using a trained model."""
    notice = _RandomInitNotice()
    root = logging.getLogger()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


def _create_encoder(model: str, pretrained: Optional[str], checkpoint: Optional[str | Path],
                    image_size: Optional[int], hub_weights: bool,
                    open_clip_config: Optional[dict[str, Any]]) -> Encoder:
    if pretrained and checkpoint:
        raise ValueError("give --pretrained or --checkpoint, not both")
    name = resolve_model_name(model)
    hub = is_hub_model(name)
    if hub:
        repo = name[len(HF_HUB_PREFIX):]
        if len([part for part in repo.split("/") if part]) != 2:
            raise ValueError(f"model {model!r}: write a Hugging Face model as hf-hub:ORG/REPO, "
                             "e.g. hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
        if pretrained:
            raise ValueError(f"--pretrained does not apply to {model!r}: it brings its repository's "
                             "weights (drop --pretrained, or pass --checkpoint FILE to start from others)")
    elif name not in open_clip.list_models():
        raise ValueError(
            f"unknown model {model!r}: use 'tiny', an open_clip name such as ViT-B-32, or "
            "hf-hub:ORG/REPO"
        )
    if hub and open_clip_config is not None:
        encoder = _stored_encoder(name, open_clip_config, image_size)
        if checkpoint is not None:
            load_open_clip_weights(encoder.clip, checkpoint)
        return encoder
    kwargs: dict[str, Any] = {}
    if hub:
        # Without this open_clip only logs a failed weights download and goes on with a
        # random model, which would then be trained as if it were the pretrained one.
        kwargs["load_weights"] = kwargs["require_pretrained"] = hub_weights and checkpoint is None
    if image_size:
        kwargs["force_image_size"] = image_size
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"checkpoint file {checkpoint} does not exist")
    if pretrained and not Path(pretrained).is_file():  # open_clip also takes a weights file
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise ValueError(
                f"open_clip has no pretrained weights {pretrained!r} for model {model!r}; "
                + (f"its tags: {', '.join(tags)}" if tags else
                   "it has none: train it from scratch (no --pretrained) or pass --checkpoint FILE"))
    download_log = _DownloadFailureLog()
    logging.getLogger().addFilter(download_log)
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained or None, **kwargs
        )
    except (RuntimeError, OSError) as exc:
        if hub:
            raise ValueError(
                f"could not load {model!r} through open_clip from the Hugging Face Hub "
                f"({str(exc)[:300]}); check the network and the repository name (an open_clip "
                "repository holds open_clip_config.json and open_clip_pytorch_model.bin or "
                "open_clip_model.safetensors), or, with HF_HUB_OFFLINE=1, that the Hugging Face "
                "cache (HF_HUB_CACHE or HF_HOME) holds them") from None
        if not pretrained:
            raise
        # The download failed (no network, a proxy, a full disk): say what was being fetched.
        raise ValueError(f"could not load the pretrained weights {pretrained!r} of {model!r} through "
                         f"open_clip ({str(exc)[:200]}); check the network, or download them and pass "
                         "--checkpoint FILE") from None
    finally:
        logging.getLogger().removeFilter(download_log)
    if checkpoint is not None:
        load_open_clip_weights(clip, checkpoint)
    tokenizer = _tokenizer(name)
    stored = None
    if hub:
        # The preprocessing open_clip settled on, less the input size (the model's own).
        stored = {"model_cfg": open_clip.get_model_config(name),
                  "preprocess_cfg": {k: v for k, v in clip.visual.preprocess_cfg.items() if k != "size"}}
    return Encoder(clip, name, tokenizer, preprocess, open_clip_config=stored)


def _stored_encoder(name: str, config: dict[str, Any], image_size: Optional[int]) -> Encoder:
    """The encoder of an hf-hub: model from its stored open_clip config, without weights.

    open_clip takes a config only from a Hub repository, a folder or its registry, so the
    architecture is registered under a name made from its content; open_clip's tokenizer
    for that name follows the config (context length, an hf_tokenizer_name) as for the Hub's.
    """
    from open_clip.factory import _MODEL_CONFIGS  # add_model_config reads only files
    from open_clip.transform import PreprocessCfg, image_transform_v2

    model_cfg = config.get("model_cfg") if isinstance(config, dict) else None
    if not isinstance(model_cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(model_cfg):
        raise ValueError(f"the stored open_clip config of {name!r} (open_clip_config.json in its "
                         "checkpoint) has no model_cfg with embed_dim, vision_cfg and text_cfg; delete "
                         "the file to rebuild the model through the Hugging Face Hub, or retrain")
    text = json.dumps(model_cfg, sort_keys=True)
    arch = STORED_CONFIG_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:16]
    _MODEL_CONFIGS.setdefault(arch, json.loads(text))  # create_model works on a copy
    kwargs: dict[str, Any] = {"force_image_size": image_size} if image_size else {}
    # pretrained_text: an HF text tower's own weights would be fetched, then replaced too.
    clip = open_clip.create_model(arch, pretrained=None, pretrained_text=False,
                                  force_preprocess_cfg=dict(config.get("preprocess_cfg") or {}), **kwargs)
    preprocess = image_transform_v2(PreprocessCfg(**clip.visual.preprocess_cfg), is_train=False)
    return Encoder(clip, name, _tokenizer(arch), preprocess, open_clip_config=config)


@functools.lru_cache(maxsize=8)
def _tokenizer(name: str):
    """open_clip's tokenizer for a model; reading its BPE vocabulary costs ~0.3 s, once."""
    return open_clip.get_tokenizer(name)


def load_open_clip_weights(clip: nn.Module, path: str | Path) -> None:
    """Load a file of open_clip weights into `clip`, with a clear error on mismatch."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (PermissionError, IsADirectoryError):
        raise
    except Exception as exc:  # not a torch file, truncated (OSError too), or more than weights
        if isinstance(exc, pickle.UnpicklingError):  # torch's text is a page on weights_only
            reason = "not a torch.save file of tensors"
        else:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise ValueError(f"{path}: not a file of open_clip weights that torch can load ({reason})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state_dict of open_clip weights")
    # Weights saved from DataParallel / DDP carry a 'module.' prefix.
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    try:
        clip.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit this model ({str(exc)[:300]})") from exc


def model_config(name: str) -> dict:
    """The open_clip architecture config of a model name (for the checkpoint's record)."""
    cfg = open_clip.get_model_config(resolve_model_name(name))
    return json.loads(json.dumps(cfg)) if cfg is not None else {}
