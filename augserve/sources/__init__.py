"""Image sources: the datasets augmentation workers read from.

Every source yields uint8 HWC images (C = 1 or 3) and int64 labels; see ``Source``.
Built-ins (``digits``, ``shapes``, ``photos``) never download anything; ImageFolder directories
and ``.npz`` files are opened by path. Workers re-open a source from ``(name, split, options)``.
Sources that read files refuse images over ``max_pixels`` (default ``DEFAULT_MAX_PIXELS``) before
decoding them; ImageFolder datasets are confined to their root folder.
"""

from .base import DEFAULT_MAX_PIXELS, SPLITS, Source
from .errors import CorruptImageError
from .folder import ImageFolder
from .decode import EncodedImage, Placement
from .iterate import SkipStats, iter_encoded, iter_images
from .npz import NpzSource
from .open import open_dataset
from .registry import builtin_names, register_builtin

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SPLITS",
    "CorruptImageError",
    "EncodedImage",
    "ImageFolder",
    "NpzSource",
    "Placement",
    "SkipStats",
    "Source",
    "builtin_names",
    "iter_encoded",
    "iter_images",
    "open_dataset",
    "register_builtin",
]
