"""Pretrained weights, offline: a weights file of the repository's (weights/, under DVC) or timm's
own weights from the local cache, loaded into a backbone with its classifier head replaced.

A weights file is a state dict: `.safetensors`, or `.pt`/`.pth` read with `weights_only=True`
(pickled code is refused, never run), also the dict of a reprolab `models/model.pt` (its network
part). Loading keeps every tensor that matches the network by name and shape, leaves the head
freshly initialised for the data's classes, adapts a first convolution of another channel count
(timm's adapt_input_conv: RGB summed for grayscale), and refuses weights of another architecture:
every backbone tensor must be in the file with its shape.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reprolab.errors import ConfigError
from reprolab.files import sha256_file

log = logging.getLogger(__name__)

SUFFIXES = (".pt", ".pth", ".safetensors")
ALLOWED = ("a state dict saved with torch.save(net.state_dict(), 'weights/x.pt') or "
           "safetensors, under weights/ (`dvc add` it)")


@dataclass(frozen=True)
class Weights:
    state: dict[str, torch.Tensor]
    source: str  # the file (repository-relative) or timm's hub id
    sha256: str  # of the file read

    @property
    def record(self) -> dict[str, str]:
        """What the model spec and the run's lineage keep of them."""
        return {"source": self.source, "sha256": self.sha256}


def read_file(path: Path, shown: str | None = None) -> dict[str, torch.Tensor]:
    """A weights file -> its state dict of tensors; anything else refused in one line, naming
    it as `shown` (model.pretrained's value)."""
    where = f"model.pretrained = {shown or str(path)!r}"
    if path.suffix not in SUFFIXES:
        raise ConfigError(f"{where}: not a weights file ({', '.join(SUFFIXES)}); "
                          f"allowed: {ALLOWED}")
    if not path.is_file():
        raise ConfigError(f"{where}: not found; allowed: {ALLOWED} "
                          "(a second clone gets it with `dvc pull`)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            blob: Any = load_file(str(path), device="cpu")
        else:
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling and format errors all mean "refused"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        what = "holds pickled code or objects other than tensors" if \
            "weights_only" in str(exc).lower() or "unpickl" in str(exc).lower() else \
            "cannot be read as weights"
        raise ConfigError(f"{where}: {what} ({first}); allowed: "
                          f"{ALLOWED}") from None
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        blob = blob["state_dict"]
        if any(k.startswith("1.") for k in blob):  # a reprolab model.pt: its network part
            blob = {k[2:]: v for k, v in blob.items() if k.startswith("1.")}
    if not isinstance(blob, dict) or not blob or \
            not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise ConfigError(f"{where}: not a state dict (a mapping of names to "
                          f"tensors); allowed: {ALLOWED}")
    return {k.removeprefix("module."): v for k, v in blob.items()}  # saved from DDP


def from_file(rel: str, base_dir: Path) -> Weights:
    path = base_dir / rel
    state = read_file(path, rel)
    return Weights(state, rel, sha256_file(path))


def timm_cached(name: str, allow_download: bool) -> Weights:
    """timm's own pretrained weights of `timm/<architecture>[.tag]`, from the local cache (the
    Hugging Face hub cache, or torch hub's for weights timm names by URL); downloaded only
    with model.allow_download."""
    from reprolab.models import timm_data_config

    cfg = timm_data_config(name)
    where = "the hub" if allow_download else \
        "the local cache (model.allow_download is false: no download)"
    if cfg["hf_hub_id"]:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        problems = []
        for filename in ("model.safetensors", "pytorch_model.bin"):
            try:
                path = Path(hf_hub_download(cfg["hf_hub_id"], filename,
                                            local_files_only=not allow_download))
            except (LocalEntryNotFoundError, EntryNotFoundError, OSError) as exc:
                problems.append(type(exc).__name__)
                continue
            return Weights(read_file(path), cfg["hf_hub_id"], sha256_file(path))
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or \
            "~/.cache/huggingface"
        raise ConfigError(f"model.pretrained = true: no weights of {cfg['hf_hub_id']} in "
                          f"{where} ({cache}); allowed: put them in the cache, set "
                          "model.allow_download: true, or give a file under weights/")
    if cfg["url"]:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg["url"])
        if not path.is_file() and allow_download:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(cfg["url"], str(path))
        if path.is_file():
            return Weights(read_file(path), cfg["url"], sha256_file(path))
        raise ConfigError(f"model.pretrained = true: {path} not in {where}; allowed: download "
                          "it there, set model.allow_download: true, or give a file under "
                          "weights/")
    raise ConfigError(f"model.pretrained = true: timm knows no pretrained weights of {name}; "
                      "allowed: a weights file under weights/")


def resolve(name: str, pretrained: str | bool | None, base_dir: Path, allow_download: bool
            ) -> Weights | None:
    """model.pretrained -> the weights to start from, or None (random initialisation)."""
    if pretrained is None or pretrained is False:
        return None
    if pretrained is True:
        return timm_cached(name, allow_download)
    return from_file(str(pretrained), base_dir)


def load_into(model: nn.Module, weights: Weights, head: str | None, first_conv: str | None
              ) -> str:
    """Load `weights` into the network of a built model (its module 1), the head left as built.
    -> one line saying what was loaded, missing and unexpected. Weights of another architecture
    (a backbone tensor missing, or of another shape) are refused in one line."""
    net = model[1]
    head = head.removeprefix("1.") if head else None

    def in_head(key: str) -> bool:
        return head is not None and (key == head or key.startswith(head + "."))

    own = net.state_dict()
    state = dict(weights.state)
    conv = f"{first_conv}.weight" if first_conv else _first_conv(net)
    if conv and conv in state and conv in own and state[conv].shape != own[conv].shape and \
            state[conv].shape[1] != own[conv].shape[1]:
        from timm.models import adapt_input_conv

        state[conv] = adapt_input_conv(own[conv].shape[1], state[conv])
    wrong = [k for k, v in own.items() if not in_head(k) and not k.endswith("num_batches_tracked")
             and (k not in state or state[k].shape != v.shape)]
    if wrong:
        first = wrong[0]
        theirs = "missing" if first not in state else \
            "x".join(map(str, state[first].shape))
        backbone = sum(1 for k in own if not in_head(k) and not k.endswith("num_batches_tracked"))
        raise ConfigError(
            f"model.pretrained = {weights.source!r}: not weights of this network: {len(wrong)} of "
            f"{backbone} backbone tensors missing or of another shape ({first}: "
            f"{'x'.join(map(str, own[first].shape))} in the network, {theirs} in the file); "
            "allowed: weights saved from the same architecture")
    load = {k: v for k, v in state.items() if k in own and not in_head(k)
            and v.shape == own[k].shape}
    unexpected = sorted(k for k in state if k not in own)
    skipped_head = sorted(k for k in state if k in own and in_head(k))
    net.load_state_dict(load, strict=False)
    missing = [k for k in own if k not in load and not in_head(k)]
    line = (f"pretrained {weights.source} (sha256 {weights.sha256[:12]}): {len(load)} tensors "
            f"loaded; head {head or '(none)'} initialised for the data's classes")
    if skipped_head:
        line += f" ({len(skipped_head)} head tensors of the file left out)"
    line += f"; missing {len(missing)}; unexpected {len(unexpected)}"
    if unexpected:
        line += " (" + ", ".join(unexpected[:3]) + (", ..." if len(unexpected) > 3 else "") + ")"
    log.info("%s", line)
    return line


def _first_conv(net: nn.Module) -> str | None:
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            return f"{name}.weight"
    return None

