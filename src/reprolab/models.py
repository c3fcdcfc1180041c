"""Models: a name, `timm/<architecture>` or an import path -> a network; the model spec that
rebuilds it; the input stage that makes it take raw pixels; the checkpoint file.

`model.name` is one of three things, and none is special anywhere else:
- a built-in name (the table BUILTIN: ordinary import paths into reprolab.nets);
- `timm/<architecture>`: any architecture `timm.create_model` knows;
- `package.module:Callable`: your own network (nets/example.py shows the contract).

A built model is `nn.Sequential(InputStage, network)`: it takes float32 images N x C x H x W
with pixel values 0..255 (the uint8 values of the processed splits, or of an image file) and
returns logits; the input stage resizes, repeats grayscale to three channels and normalises on
the device, so `predict` and serving need nothing but the model. `with_probabilities` wraps it
for serving so that the logged model returns class probabilities.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reprolab.errors import ConfigError, DataError
from reprolab.plugins import code_sha256, is_import_path, load_object

if TYPE_CHECKING:  # torch is imported by the functions that build: config reads the table here
    from torch import nn

# name -> import path: the built-in networks are entries like any other
BUILTIN = {
    "simple_cnn": "reprolab.nets:SimpleCNN",
    "fast_cnn": "reprolab.nets:FastCNN",
    "resnet18": "reprolab.nets:resnet18",
}
TIMM = "timm/"
ALLOWED = (f"a built-in name ({', '.join(BUILTIN)}), timm/<architecture>, or "
           "package.module:Callable (your own network, as nets/example.py)")
# where a network keeps its classifier head, when timm's config does not say (see head_name)
HEAD_NAMES = ("head", "fc", "classifier")


def name_problem(name: str) -> str | None:
    """Why `model.name` cannot name a model (config validation, no imports), or None."""
    if name in BUILTIN or is_import_path(name):
        return None
    if name.startswith(TIMM) and len(name) > len(TIMM):
        return None
    close = difflib.get_close_matches(name, list(BUILTIN), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"model.name = {name!r}: not a model; {hint}allowed: {ALLOWED}"


# ---- the model spec: everything that rebuilds a model, saved beside its weights ----


def model_spec(
    name: str, shape: Sequence[int], num_classes: int, mean: Sequence[float],
    std: Sequence[float], kwargs: dict[str, Any] | None = None, *,
    in_chans: int | None = None, input_size: Sequence[int] | None = None,
    pretrained: dict[str, str] | None = None, code_sha256: str | None = None,
) -> dict[str, Any]:
    """`shape`: C x H x W of the data (what the model takes); `in_chans` and `input_size`: what
    the network takes, when not the data's (a pretrained backbone); `mean` and `std`: one per
    network channel; `pretrained`: {source, sha256} of the weights it started from."""
    return {
        "name": name, "kwargs": dict(kwargs or {}), "shape": [int(n) for n in shape],
        "num_classes": int(num_classes), "mean": [float(m) for m in mean],
        "std": [float(s) for s in std], "in_chans": int(in_chans or shape[0]),
        "input_size": [int(n) for n in (input_size or shape[1:])],
        "pretrained": pretrained, "code_sha256": code_sha256,
    }


def timm_data_config(name: str) -> dict[str, Any]:
    """timm's pretrained config of a `timm/<architecture>[.tag]`: input size, mean, std (0..1)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name.removeprefix(TIMM)) or {}
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return {"input_size": tuple(cfg.get("input_size") or (3, 224, 224)),
            "mean": tuple(cfg.get("mean") or (0.485, 0.456, 0.406)),
            "std": tuple(cfg.get("std") or (0.229, 0.224, 0.225)),
            "classifier": cfg.get("classifier"), "first_conv": cfg.get("first_conv"),
            "hf_hub_id": cfg.get("hf_hub_id"), "url": cfg.get("url")}


def spec_for(name: str, kwargs: dict[str, Any], shape: Sequence[int], num_classes: int,
             train_mean: Sequence[float], train_std: Sequence[float],
             pretrained: dict[str, str] | None, input_size: int | None,
             base_dir: Path | None) -> dict[str, Any]:
    """The spec of a model to train. A timm backbone that starts from pretrained weights takes
    what it was pretrained on: its channels, input size and normalisation (timm's config,
    scaled to 0..255); every other model takes the data as it is, normalised with the train
    split's statistics. `input_size` (model.input_size) overrides the size either way."""
    size = (input_size, input_size) if input_size else None
    if name.startswith(TIMM) and pretrained:
        data = timm_data_config(name)
        channels = data["input_size"][0]
        return model_spec(name, shape, num_classes, [255.0 * m for m in data["mean"]],
                          [255.0 * s for s in data["std"]], kwargs, in_chans=channels,
                          input_size=size or data["input_size"][1:], pretrained=pretrained)
    code = code_sha256(name, base_dir) if is_import_path(name) else None
    return model_spec(name, shape, num_classes, train_mean, train_std, kwargs, input_size=size,
                      pretrained=pretrained, code_sha256=code)


# ---- building ----


def constructor(name: str, base_dir: Path | None) -> Callable[..., Any]:
    """model.name -> the callable that builds the network (see reprolab.nets' contract)."""
    if name in BUILTIN:
        return load_object(BUILTIN[name], None, "model.name", ALLOWED)
    if name.startswith(TIMM):
        import timm

        arch = name.removeprefix(TIMM)
        if not timm.is_model(arch):
            close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(TIMM + c for c in close)}? " if close else ""
            raise ConfigError(f"model.name = {name!r}: timm has no architecture {arch!r}; "
                              f"{hint}allowed: timm/<one of timm.list_models()>")

        def timm_model(**kw: Any) -> Any:
            return timm.create_model(arch, pretrained=False, **kw)

        return timm_model
    net = load_object(name, base_dir, "model.name", ALLOWED)
    if not callable(net):
        raise ConfigError(f"model.name = {name!r}: a {type(net).__name__}, not a callable; "
                          f"allowed: {ALLOWED}")
    return net


def _takes(fn: Callable[..., Any], keyword: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return keyword in params


def build_net(spec: dict[str, Any], base_dir: Path | None = None) -> nn.Module:
    """The network of a spec, freshly initialised (weights come from a checkpoint or
    pretrained.load_into). Bad kwargs or a callable that builds no nn.Module: one line."""
    name, kwargs = spec["name"], spec["kwargs"]
    make = constructor(name, base_dir)
    args = {"num_classes": spec["num_classes"], "in_chans": spec["in_chans"], **kwargs}
    if _takes(make, "input_size"):
        args["input_size"] = tuple(spec["input_size"])
    try:
        inspect.signature(make).bind(**args)
    except TypeError as exc:
        raise ConfigError(f"model.kwargs = {kwargs}: {name} refuses them ({exc}); allowed: "
                          f"{_keywords(make)}") from None
    except ValueError:  # no signature to check (a builtin or C callable): let it say
        pass
    try:
        net = make(**args)
    except TypeError as exc:
        if "keyword" not in str(exc):
            raise
        raise ConfigError(f"model.kwargs = {kwargs}: {name} refuses them ({exc})") from None
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"model.name = {name!r} with model.kwargs = {kwargs}: building it "
                          f"failed ({type(exc).__name__}: {exc})") from None
    from torch import nn

    if not isinstance(net, nn.Module):
        raise ConfigError(f"model.name = {name!r}: built a {type(net).__name__}, not a "
                          f"torch.nn.Module; allowed: {ALLOWED}")
    return net


def _keywords(fn: Callable[..., Any]) -> str:
    names = [p for p in inspect.signature(fn).parameters
             if p not in ("num_classes", "in_chans", "input_size", "self")]
    return f"model.kwargs keys {', '.join(names)}" if names else "no model.kwargs ({})"


def build(spec: dict[str, Any], base_dir: Path | None = None) -> nn.Sequential:
    from torch import nn

    from reprolab.nets import InputStage

    stage = InputStage(spec["mean"], spec["std"], spec["shape"], spec["in_chans"],
                       spec["input_size"])
    return nn.Sequential(stage, build_net(spec, base_dir))


def check_output(model: nn.Module, spec: dict[str, Any]) -> None:
    """A network must map images to N x num_classes logits: refused in one line otherwise,
    before any training."""
    import torch

    with torch.no_grad():
        was = model.training
        model.eval()
        try:
            out = model(torch.zeros(2, *spec["shape"]))
        except Exception as exc:  # noqa: BLE001 - the user's forward may fail in any way
            raise ConfigError(f"model.name = {spec['name']!r}: cannot take 2 images of "
                              f"{'x'.join(map(str, spec['shape']))} ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        finally:
            model.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, spec["num_classes"]):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model.name = {spec['name']!r}: returns {got} for 2 images; allowed: "
                          f"logits of shape N x num_classes ({spec['num_classes']})")


def head_name(model: nn.Module) -> str | None:
    """The qualified name of the classifier head of a built model (`1.fc`): timm's config says
    it; else a child named head, fc or classifier; else the last nn.Linear. None: no head."""
    from torch import nn

    net = model[1]
    names = dict(net.named_modules())
    cfg = getattr(net, "pretrained_cfg", None) or {}
    found = cfg.get("classifier") if isinstance(cfg, dict) else None
    if found not in names:
        found = next((n for n in HEAD_NAMES if n in names), None)
    if found is None:
        linear = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
        found = linear[-1] if linear else None
    return f"1.{found}" if found else None


def with_probabilities(model: nn.Module) -> nn.Module:
    from torch import nn

    return nn.Sequential(model, nn.Softmax(dim=1))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- the model file (models/model.pt): train writes it, evaluate reads it ----


def save_checkpoint(path: Any, spec: dict[str, Any], model: nn.Module) -> None:
    """The spec and the weights, nothing else: the file is a pure function of both, so its
    sha256 names the model (MLflow runs and registry versions carry it)."""
    import torch

    torch.save({"spec": spec, "state_dict": model.state_dict()}, path)


def load_checkpoint(path: Any, base_dir: Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """-> (model in eval mode, spec); loading runs no pickled code (weights_only). A network of
    your own is imported from `base_dir` (the repository)."""
    import torch

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found; run `reprolab train` first")
    blob = torch.load(path, weights_only=True, map_location="cpu")
    model = build(blob["spec"], base_dir)
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob["spec"]


def check_fits(model_shape: Any, data_shape: Any, model_what: str, data_what: str, fix: str
               ) -> None:
    """Refuse, in one line, a model whose input (C x H x W) is not the data's: a model of 8x8
    digits asked about 28x28 images would fail deep inside torch, or answer nonsense."""
    model_shape, data_shape = tuple(model_shape), tuple(data_shape)
    if model_shape != data_shape:
        def text(shape: tuple[int, ...]) -> str:
            return f"{'x'.join(map(str, shape))} ({shape[0]} channel{'s' * (shape[0] != 1)})"

        raise DataError(f"{model_what}: takes {text(model_shape)} images, but {data_what} holds "
                        f"{text(data_shape)}; {fix}")
