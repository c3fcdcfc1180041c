"""`reprolab predict [--model URI] PATH...`: class and probability per image.

Any image file PIL reads works: it is converted to the model's channel count and resized to its
input size, then passed as raw pixels (the model normalises itself). An unreadable file is
reported by name, and the others are still predicted.

The default model is the champion of this project's registered model, and it must take the
images the project's data holds (channel count and size): a champion of another dataset is
refused, never asked about images it has not seen. `--model` is taken as given: a registry or
run URI, an MLflow model folder, or a models/model.pt checkpoint (these two need no store and no
params.yaml).

Digit-like models learn the polarity of their ink: trained on light strokes on a dark background
(MNIST, the digits), they answer dark strokes on white paper confidently wrong. predict warns in
one line when it sees that, and `--invert` flips the images.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reprolab.config import Config
from reprolab.data.imagefolder import IMAGE_EXTENSIONS, is_image_name


@dataclass(frozen=True)
class Prediction:
    path: str
    label: str | None = None
    probability: float | None = None
    probabilities: list[float] | None = None
    error: str | None = None
    # the image's ink is the opposite of the training data's (see light_background)
    ink_mismatch: bool = False


def expand(paths: list[str]) -> list[Path]:
    """Files as given; directories become their image files (by extension, as preprocess
    reads them), sorted."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(p.name))
        else:
            out.append(path)
    return out


def load_image(path: Path, shape: tuple[int, ...], max_pixels: int | None = None) -> np.ndarray:
    """-> float32 C x H x W, pixel values 0..255, as the model takes them.

    Like preprocess, it refuses a file that is not a regular file (a FIFO would wait forever) and
    an image of more than `max_pixels` pixels (default: params.yaml's data.max_image_pixels), from
    its header, before anything is decoded."""
    from PIL import Image

    from reprolab.data.imagefolder import DEFAULT_MAX_PIXELS, open_regular, pixel_limit, to_pixels

    limit = max_pixels or DEFAULT_MAX_PIXELS
    with open_regular(Path(path)) as fh, pixel_limit(limit), Image.open(fh) as image:
        return to_pixels(image, *shape).astype(np.float32)


# ---- ink polarity ----


def trained_on_dark(model: Any) -> bool:
    """Whether the model learnt light strokes on a dark background, from the training split's
    statistics that its Normalize layer holds: one channel, mostly dark pixels with a few bright
    ones, so the spread exceeds the mean (MNIST: mean 33, std 78; digits: 78 and 96). Photos
    (std below the mean) and colour models are never flagged."""
    buffers = dict(model.named_buffers())
    mean = next((b for n, b in buffers.items() if n.endswith("mean")), None)
    std = next((b for n, b in buffers.items() if n.endswith("std")), None)
    if mean is None or std is None or mean.numel() != 1:
        return False
    return float(std) > float(mean)


def light_background(pixels: np.ndarray) -> bool:
    """Whether an image (C x H x W, 0..255) has a light background with darker strokes: its
    border (the background of a centred character) is light and brighter than the image's
    mean (the darker strokes pull the mean down)."""
    gray = pixels.mean(axis=0)
    border = np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])
    background = float(np.median(border))
    return background >= 128 and background > float(gray.mean())


# ---- loading ----


def load_checkpoint_model(path: Path) -> tuple[Any, tuple[int, ...], list[str]]:
    """A models/model.pt checkpoint (weights only, no pickled code) -> (model returning
    probabilities, input shape, class names: the checkpoint holds none, so their indices)."""
    from reprolab.models import load_checkpoint, with_probabilities

    model, spec = load_checkpoint(path, Path.cwd())  # a network of your own: from nets/ here
    return with_probabilities(model), tuple(spec["shape"]), []


def load_model(model_uri: str, allow_pickle: bool) -> tuple[Any, tuple[int, ...], list[str]]:
    from reprolab import registry

    if Path(model_uri).is_file():
        return load_checkpoint_model(Path(model_uri))
    return registry.load_classifier(model_uri, allow_pickle)


def read_images(files: list[Path], shape: tuple[int, ...], max_pixels: int | None, invert: bool
                ) -> tuple[dict[Path, Prediction], list[Path], list[np.ndarray]]:
    """-> (a Prediction with the error of each unreadable file, the readable files, their
    pixels)."""
    errors: dict[Path, Prediction] = {}
    good, images = [], []
    for path in files:
        try:
            pixels = load_image(path, shape, max_pixels)
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds; name the file, go on
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            errors[path] = Prediction(str(path), error=f"cannot read image ({reason})")
            continue
        images.append(255.0 - pixels if invert else pixels)
        good.append(path)
    return errors, good, images


def run(model_uri: str, paths: list[str], cfg: Config | None = None,
        allow_pickle: bool = False, invert: bool = False,
        data_shape: tuple[tuple[int, ...], str] | None = None) -> list[Prediction]:
    """`data_shape`: (C x H x W, what holds it) that the model must take, or None: any."""
    import torch

    from reprolab import tracking

    if not Path(model_uri).exists():  # a folder or checkpoint needs no store
        tracking.use_store(cfg)
    model, shape, classes = load_model(model_uri, allow_pickle)
    if data_shape is not None:
        from reprolab.models import check_fits

        check_fits(shape, data_shape[0], model_uri, data_shape[1],
                   "set register.model_name to this data's model, or pass --model")
    files = expand(paths)
    max_pixels = cfg.data.max_image_pixels if cfg else None
    results, good, images = read_images(files, shape, max_pixels, invert)
    if images:
        dark = trained_on_dark(model)
        with torch.no_grad():
            probs = model(torch.from_numpy(np.stack(images))).numpy()
        for path, pixels, row in zip(good, images, probs, strict=True):
            best = int(row.argmax())
            label = classes[best] if classes else str(best)
            results[path] = Prediction(str(path), label, float(row[best]),
                                       [float(p) for p in row],
                                       ink_mismatch=dark and light_background(pixels))
    return [results[path] for path in files]


def format_table(predictions: list[Prediction]) -> str:
    width = max([len(p.path) for p in predictions] + [4])
    lines = [f"{'path':<{width}}  {'class':<12}  probability"]
    for p in predictions:
        if p.error is None:
            lines.append(f"{p.path:<{width}}  {p.label:<12}  {p.probability:.4f}")
    return "\n".join(lines)


def default_model(cfg: Config | None) -> tuple[str, tuple[tuple[int, ...], str] | None]:
    """-> (the champion of this project's registered model, the shape of the project's data when
    preprocess has written it). Refused, naming what to run first, when there is none."""
    from reprolab import registry, tracking
    from reprolab.data import META
    from reprolab.errors import ConfigError, DataError
    from reprolab.files import read_json

    if cfg is None:
        raise ConfigError("no params.yaml here; pass --model URI (models:/NAME@champion,"
                          " runs:/ID/model, an MLflow model folder or models/model.pt), or run "
                          "in the project")
    name = cfg.registered_model_name
    tracking.use_store(cfg)
    if not registry.model_versions(name):
        raise DataError(
            f"registered model {name!r} has no versions in {cfg.mlflow_uri}; run "
            "`dvc repro` (or train, evaluate and register) first, or pass --model URI"
        )
    meta = cfg.processed_dir / META
    data = (tuple(read_json(meta)["shape"]), f"{meta} ({cfg.data.dataset})") \
        if meta.is_file() else None
    return f"models:/{name}@champion", data


def ink_warning(predictions: list[Prediction], invert: bool) -> str | None:
    """One line for every image whose ink is the opposite of the training data's, or None."""
    flagged = [p.path for p in predictions if p.ink_mismatch]
    if not flagged:
        return None
    which = f"{flagged[0]}" + (f" and {len(flagged) - 1} more" if len(flagged) > 1 else "")
    advice = "drop --invert" if invert else "pass --invert to flip them"
    return (f"reprolab predict: warning: {which}: dark strokes on a light background, but the "
            f"model was trained on light strokes on a dark one; {advice}")


def main(cfg: Config | None, args: Any) -> int:
    from reprolab.errors import ConfigError

    if not args.paths:
        raise ConfigError("give at least one image file or directory")
    model_uri, data_shape = (args.model, None) if args.model else default_model(cfg)
    predictions = run(model_uri, args.paths, cfg, allow_pickle=args.allow_pickle,
                      invert=args.invert, data_shape=data_shape)
    if not predictions:
        raise ConfigError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in "
                          f"{' '.join(args.paths)}")
    if args.json:
        print(json.dumps([p.__dict__ for p in predictions], indent=2))
    else:
        print(format_table(predictions))
    warning = ink_warning(predictions, args.invert)
    if warning:
        print(warning, file=sys.stderr)
    failed = [p for p in predictions if p.error]
    for p in failed:
        print(f"reprolab predict: {p.path}: {p.error}", file=sys.stderr)
    return 2 if failed else 0
