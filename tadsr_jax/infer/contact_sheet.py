"""A labelled row of equally sized images (the timestep sweep's contact sheet)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GAP = 4


def contact_sheet(panels: Sequence[tuple[str, np.ndarray]], *, background: int = 255) -> np.ndarray:
    """[(label, uint8 (H, W, 3)), ...] -> one uint8 image: the panels side by side, each label above its panel."""
    if not panels:
        raise ValueError("contact_sheet needs at least one panel")
    shapes = {p.shape for _, p in panels}
    if len(shapes) != 1:
        raise ValueError(f"contact sheet panels must share one shape, got {sorted(shapes)}")
    h, w, _ = panels[0][1].shape
    font = ImageFont.load_default(size=max(10, min(32, w // 12)))
    label_h = font.getbbox("Ag")[3] + 2 * GAP
    sheet = Image.new("RGB", (len(panels) * (w + GAP) + GAP, h + label_h + GAP), (background,) * 3)
    draw = ImageDraw.Draw(sheet)
    for i, (label, pixels) in enumerate(panels):
        x = GAP + i * (w + GAP)
        draw.text((x, GAP), label, fill=(0, 0, 0), font=font)
        sheet.paste(Image.fromarray(pixels), (x, label_h))
    return np.asarray(sheet)
