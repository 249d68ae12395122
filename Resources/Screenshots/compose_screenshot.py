"""Compose the extension's screenshot from what `lndgst demo` writes (not a picture of the panel).

    lndgst --home /tmp/h demo --iterations 20 --output /tmp/d
    python Resources/Screenshots/compose_screenshot.py /tmp/d Resources/Screenshots/LymphNodeDGST-1.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402


def compose(demo_output: Path, destination: Path) -> None:
    # (file, title, crop rows, crop columns): the overlays are cut to the neck around the node.
    panels = [("overlay_before.png", "before adaptation", slice(110, 430), slice(70, 430)),
              ("overlay_after.png", "after DGST adaptation", slice(110, 430), slice(70, 430)),
              ("adaptation_report.png", "the adaptation report", slice(None), slice(None))]
    figure = plt.figure(figsize=(12, 3.6), dpi=100)
    grid = figure.add_gridspec(1, 3, width_ratios=[1.1, 1.1, 2.5], wspace=0.03)
    for column, (name, title, rows, columns) in enumerate(panels):
        axis = figure.add_subplot(grid[0, column])
        axis.imshow(mpimg.imread(demo_output / name)[rows, columns])
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    figure.suptitle("LymphNodeDGST: lymph-node segmentation (green truth, red model) and site "
                    "adaptation, from `lndgst demo`", fontsize=10)
    destination.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(destination, bbox_inches="tight")
    plt.close(figure)
    with Image.open(destination) as image:  # a palette PNG: a few tens of kB
        image.convert("RGB").quantize(colors=128).save(destination, optimize=True)


if __name__ == "__main__":
    compose(Path(sys.argv[1]), Path(sys.argv[2]))
