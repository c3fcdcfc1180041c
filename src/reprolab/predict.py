"""`reprolab predict --model models:/<name>@champion PATH...`: class and probability per image.

Any image file PIL reads works: it is converted to the model's channel count and resized to its
input size, then passed as raw pixels (the model normalises itself). An unreadable file is
reported by name, and the others are still predicted.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reprolab.config import Config

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class Prediction:
    path: str
    label: str | None = None
    probability: float | None = None
    probabilities: list[float] | None = None
    error: str | None = None


def expand(paths: list[str]) -> list[Path]:
    """Files as given; directories become their image files, sorted."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out += sorted(p for p in path.rglob("*")
                          if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
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


def run(model_uri: str, paths: list[str], cfg: Config | None = None,
        allow_pickle: bool = False) -> list[Prediction]:
    import torch

    from reprolab import tracking

    if cfg is not None:
        tracking.configure(cfg)
    model, shape, classes = tracking.load_classifier(model_uri, allow_pickle)
    files = expand(paths)
    results: dict[Path, Prediction] = {}
    images, good = [], []
    for path in files:
        try:
            images.append(load_image(path, shape, cfg.data.max_image_pixels if cfg else None))
            good.append(path)
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds; name the file, go on
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            results[path] = Prediction(str(path), error=f"cannot read image ({reason})")
    if images:
        with torch.no_grad():
            probs = model(torch.from_numpy(np.stack(images))).numpy()
        for path, row in zip(good, probs, strict=True):
            best = int(row.argmax())
            label = classes[best] if classes else str(best)
            results[path] = Prediction(str(path), label, float(row[best]),
                                       [float(p) for p in row])
    return [results[path] for path in files]


def format_table(predictions: list[Prediction]) -> str:
    width = max([len(p.path) for p in predictions] + [4])
    lines = [f"{'path':<{width}}  {'class':<12}  probability"]
    for p in predictions:
        if p.error is None:
            lines.append(f"{p.path:<{width}}  {p.label:<12}  {p.probability:.4f}")
    return "\n".join(lines)


def main(cfg: Config, args: Any) -> int:
    from reprolab.errors import ConfigError

    model_uri = args.model or f"models:/{cfg.register.model_name}@champion"
    if not args.paths:
        raise ConfigError("predict: give at least one image file or directory")
    predictions = run(model_uri, args.paths, cfg, allow_pickle=args.allow_pickle)
    if not predictions:
        raise ConfigError(f"predict: no image files in {' '.join(args.paths)}")
    if args.json:
        print(json.dumps([p.__dict__ for p in predictions], indent=2))
    else:
        print(format_table(predictions))
    failed = [p for p in predictions if p.error]
    for p in failed:
        print(f"reprolab predict: {p.path}: {p.error}", file=sys.stderr)
    return 2 if failed else 0
