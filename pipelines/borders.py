"""The border modes of a pipeline spec (``border: constant | replicate``) in each library's terms.

``constant`` fills pixels from outside the image with the spec's ``fill``; ``replicate`` repeats the
nearest edge pixel. One table, so every backend means the same thing by each name.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2


@dataclass(frozen=True)
class BorderMode:
    """``opencv``: the ``borderMode`` of ``warpAffine``/``remap``/``copyMakeBorder``.
    ``torch_padding``: ``grid_sample``'s ``padding_mode`` (the torch backend samples ``image - fill``
    with zero padding for ``constant``, so ``zeros`` reproduces any fill). ``pads_with_fill``: whether
    pixels outside the image take ``fill`` — what DALI's ``slice`` can pad an integer window with."""

    opencv: int
    torch_padding: str
    pads_with_fill: bool


BORDERS: dict[str, BorderMode] = {
    "constant": BorderMode(opencv=cv2.BORDER_CONSTANT, torch_padding="zeros", pads_with_fill=True),
    "replicate": BorderMode(opencv=cv2.BORDER_REPLICATE, torch_padding="border", pads_with_fill=False),
}
