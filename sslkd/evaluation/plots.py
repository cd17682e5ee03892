"""Pictures of a distillation run for the tracking UI: the synthetic set before and after, the loss curve.

A hand-written image grid instead of torchvision.utils.make_grid keeps torchvision (seconds to import)
out of the distill stage.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (imported on first use: seconds to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_grid(images: torch.Tensor, columns: int, padding: int = 1) -> torch.Tensor:
    """Tile images [N, C, H, W] (pixels in [0, 1]) row by row, ``columns`` per row, with white padding.

    Returns [rows · (H + padding) + padding, columns · (W + padding) + padding, C].
    """
    count, channels, height, width = images.shape
    rows = max(1, math.ceil(count / columns))
    canvas = torch.ones(channels, rows * (height + padding) + padding, columns * (width + padding) + padding)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        top, left = padding + row * (height + padding), padding + column * (width + padding)
        canvas[:, top : top + height, left : left + width] = image
    return canvas.permute(1, 2, 0)


def plot_synthetic_set(initial: torch.Tensor, distilled: torch.Tensor, path: Path, max_images: int = 100) -> None:
    """Side-by-side grids of the first ``max_images`` initial and distilled images, both [M, C, H, W]
    in [0, 1] pixel space (clipped), written as a PNG."""
    plt = pyplot()
    count = min(len(initial), max_images)
    columns = math.ceil(math.sqrt(count))
    figure, axes = plt.subplots(1, 2, figsize=(10, 5.4))
    for axis, title, images in zip(axes, ("initial", "distilled"), (initial, distilled)):
        grid = image_grid(images[:count].detach().float().clamp(0, 1), columns).numpy()
        grey = grid.shape[-1] == 1
        axis.imshow(
            grid[..., 0] if grey else grid, cmap="gray" if grey else None, vmin=0, vmax=1, interpolation="nearest"
        )
        axis.set_title(f"{title} ({count} of {len(images)})")
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)


def plot_distillation_curve(matching_losses: list[float], learning_rates: list[float], path: Path) -> None:
    """Matching loss and inner learning rate α against the outer iteration, written as a PNG."""
    plt = pyplot()
    figure, (loss_axis, lr_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss_axis.plot(range(len(matching_losses)), matching_losses, linewidth=1)
    loss_axis.set_ylabel("matching loss ‖θ_N − θ*‖² / ‖θ₀ − θ*‖²")
    lr_axis.plot(range(len(learning_rates)), learning_rates, linewidth=1, color="tab:orange")
    lr_axis.set_ylabel("inner learning rate α")
    for axis in (loss_axis, lr_axis):
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)
