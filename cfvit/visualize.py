"""Draw the coarse patches the fine stage re-split over the images (the paper's Fig. 9)."""
import math

import numpy as np
from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend
from matplotlib.patches import Rectangle


def _to_hwc(img, mean=None, std=None) -> np.ndarray:
    x = img.detach().float().cpu().numpy() if hasattr(img, "detach") else np.asarray(img, dtype=np.float32)
    if x.ndim == 3 and x.shape[0] in (1, 3):
        x = x.transpose(1, 2, 0)
        if mean is not None:
            x = x * np.asarray(std, dtype=np.float32) + np.asarray(mean, dtype=np.float32)
    if x.ndim == 3 and x.shape[2] == 1:
        x = x[..., 0]
    if x.max() > 1.5:
        x = x / 255.0
    return np.clip(x, 0, 1)


def draw_regions(images, selected, coarse_grid: int, titles=None, mean=None, std=None, ncols: int = 8,
                 color: str = "#ff3b30"):
    """A matplotlib Figure: each image with its re-split coarse patches outlined.

    images: (B, C, H, W) tensors (normalised with mean/std, if given) or HxW[xC] arrays.
    selected: (B, k) coarse indices (rows of -1, as `infer` gives for early exits, are drawn plain).
    """
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(1.8 * ncols, 1.9 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        img = _to_hwc(images[i], mean, std)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        cell = img.shape[0] / coarse_grid
        idx = selected[i].tolist() if hasattr(selected[i], "tolist") else list(selected[i])
        for j in idx:
            if j < 0:
                continue
            r, c = divmod(int(j), coarse_grid)
            ax.add_patch(Rectangle((c * cell - 0.5, r * cell - 0.5), cell, cell, fill=True, alpha=0.25,
                                   facecolor=color, edgecolor=color, linewidth=0.8))
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=7)
    fig.tight_layout()
    return fig
