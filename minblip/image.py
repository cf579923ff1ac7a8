"""Image preprocessing: BLIP's evaluation transform, in pillow and NumPy.

salesforce/BLIP builds its test-time transform (``data/__init__.py``
``create_dataset``, ``transform_test``) as

    Resize((s, s), interpolation=BICUBIC) -> ToTensor() -> Normalize(mean, std)

with the CLIP mean and std below, after ``Image.open(path).convert('RGB')`` in
the datasets. :func:`preprocess` does the same: torchvision's ``Resize`` on a PIL
image calls pillow's ``Image.resize`` with the same filter, so the pixels agree.
The resize ignores the aspect ratio (a 512x600 photo is squashed to a square),
exactly as BLIP's evaluation does. The training augmentations
(RandomResizedCrop, flips, RandAugment) are left out.

Where pillow's ``convert('RGB')`` would decode an image wrongly, preprocessing
converts it itself: a 16-bit greyscale image (modes ``I;16*``, and ``I`` holding
16-bit values) is scaled by 255/65535 where pillow clips every value above 255
to white, and a float image (mode ``F``) in [0, 1] is scaled by 255 where
pillow truncates it to black. An image with no pixels, a file pillow cannot
decode and one larger than pillow's decompression-bomb limit
(``PIL.Image.MAX_IMAGE_PIXELS``) are refused with one line naming the file.
"""
from __future__ import annotations

import errno
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# The per-channel mean and std of CLIP's training images, which BLIP reuses
# (``transforms.Normalize`` in salesforce/BLIP ``data/__init__.py``).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


_SIXTEEN_BIT_MAX = 65535


def _load(path) -> Image.Image:
    """Open an image file and decode it now, so a broken file fails here, by name."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "a folder, not an image file", str(path))
    if not path.is_file():
        raise FileNotFoundError(f"preprocess: no image file at '{path}'")
    try:
        with warnings.catch_warnings():
            # pillow only warns between MAX_IMAGE_PIXELS and twice that: refuse both
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return im.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"preprocess: '{path}' is too large to decode safely ({err}); "
                         f"shrink the image first") from None
    except PermissionError:
        raise  # a file-system error, with its path: not a problem of the image
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"preprocess: cannot read '{path}' as an image ({err})") from None


def _to_rgb(im: Image.Image, where: str) -> Image.Image:
    """A PIL image of any mode -> an 8-bit RGB image, scaled rightly.

    ``convert('RGB')`` does it for 8-bit modes (grey copied to the three
    channels, an alpha channel dropped as BLIP's datasets drop it, palettes
    expanded, CMYK / YCbCr / LAB converted). High-depth modes are scaled here
    instead: ``I;16*`` and an ``I`` image with values in [0, 65535] (16-bit
    greyscale, as pillow opens it from PNG or TIFF) by 255/65535, a float ``F``
    image in [0, 1] by 255, both rounded. ``I`` or ``F`` values outside those
    ranges have no known scale and are refused, as is an image with no pixels.
    """
    if im.width == 0 or im.height == 0:
        raise ValueError(f"preprocess: {where} has no pixels ({im.width}x{im.height})")
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        values = np.asarray(im, dtype=np.float64)  # (H, W), any byte order
        top = 1.0 if im.mode == "F" else _SIXTEEN_BIT_MAX
        low, high = float(values.min()), float(values.max())
        if not (np.isfinite(low) and np.isfinite(high) and 0 <= low and high <= top):
            raise ValueError(f"preprocess: {where} is a mode-{im.mode} image with values in "
                             f"[{low:g}, {high:g}]; expected [0, {top:g}] (16-bit grey or a "
                             f"float image in [0, 1]): scale it to 8 bits first")
        grey = np.rint(values * (255.0 / top)).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")  # (H, W) uint8 is mode L
    if im.mode == "La":  # pillow converts premultiplied grey + alpha only through LA
        im = im.convert("LA")
    return im.convert("RGB")


def _to_pil(item, where: str) -> Image.Image:
    """One image given as a PIL image, a path or a uint8 (H, W, 3) array -> PIL image."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, (str, Path)):
        return _load(item)
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise TypeError(f"preprocess: {where}: expected uint8 pixels in [0, 255], got dtype "
                            f"{item.dtype} (a float image in [0, 1] must be scaled by 255 "
                            f"and cast to uint8 first)")
        if item.ndim != 3 or item.shape[-1] != 3:
            raise ValueError(f"preprocess: {where}: expected an RGB array of shape (H, W, 3), got "
                             f"shape {item.shape} (convert other channel layouts with pillow, "
                             f"e.g. Image.fromarray(a).convert('RGB'))")
        return Image.fromarray(item)  # a (H, W, 3) uint8 array is read as RGB
    raise TypeError(f"preprocess: {where}: expected a PIL image, a file path or a uint8 "
                    f"array, got {type(item).__name__}")


def preprocess(images, image_size: int) -> np.ndarray:
    """Turn images into the normalised float32 batch the ViT takes.

    images: a PIL image, a file path (str or Path), a uint8 array (H, W, 3) or
    (B, H, W, 3), or a non-empty list of PIL images / paths / (H, W, 3) arrays
    (sizes may differ). Every image is converted to 8-bit RGB (grayscale is
    copied to the three channels; an alpha channel is dropped, not composited,
    as ``convert('RGB')`` does in BLIP's datasets; palettes are expanded; 16-bit
    and float images are scaled to 8 bits), resized to (image_size, image_size)
    with bicubic interpolation, scaled to [0, 1] and normalised per channel with
    :data:`CLIP_MEAN` and :data:`CLIP_STD`.

    Returns a float32 array (B, 3, image_size, image_size), channels first.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)):
        raise TypeError(f"preprocess: image_size must be an int, got {type(image_size).__name__}")
    if image_size <= 0:
        raise ValueError(f"preprocess: image_size must be positive, got {image_size}")
    if isinstance(images, np.ndarray) and images.ndim == 4:
        if images.dtype != np.uint8:
            raise TypeError(f"preprocess: expected a uint8 batch (B, H, W, 3) with pixels in "
                            f"[0, 255], got dtype {images.dtype}")
        if images.shape[-1] != 3:
            raise ValueError(f"preprocess: expected an RGB batch of shape (B, H, W, 3), got "
                             f"shape {images.shape}")
        items = list(images)  # (B, H, W, 3) -> B arrays (H, W, 3)
        names = [f"image {i} of the (B, H, W, 3) array" for i in range(len(items))]
    elif isinstance(images, (list, tuple)):
        items = list(images)
        names = [f"image {i} of the list" for i in range(len(items))]
    else:
        items, names = [images], ["image"]
    if not items:
        raise ValueError("preprocess: expected at least one image, got an empty "
                         + ("array" if isinstance(images, np.ndarray) else "list"))

    batch = np.empty((len(items), image_size, image_size, 3), dtype=np.uint8)
    for i, (item, where) in enumerate(zip(items, names)):
        im = _to_rgb(_to_pil(item, where), f"'{item}'" if isinstance(item, (str, Path))
                    else where)
        # (s, s) is (width, height) for pillow and (height, width) for torchvision:
        # the same thing for a square
        batch[i] = np.asarray(im.resize((image_size, image_size), Image.BICUBIC))

    x = batch.astype(np.float32) / np.float32(255.0)  # ToTensor: uint8 -> [0, 1]
    x = (x - CLIP_MEAN) / CLIP_STD  # Normalize, channels last: (B, s, s, 3)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # (B, s, s, 3) -> (B, 3, s, s)


def denormalize(x) -> np.ndarray:
    """Undo :func:`preprocess` for display: float (B, 3, H, W) -> uint8 (B, H, W, 3).

    Values are mapped back with the CLIP mean and std, rounded and clipped to
    [0, 255] (a model's gradients or perturbations may leave that range).
    """
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating):
        got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise TypeError(f"denormalize: expected a float array (B, 3, H, W), got {got}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"denormalize: expected shape (B, 3, H, W), got {x.shape}")
    rgb = x.transpose(0, 2, 3, 1) * CLIP_STD + CLIP_MEAN  # (B, H, W, 3) in [0, 1]
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
