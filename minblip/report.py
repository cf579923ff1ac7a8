"""The report folder of a run: plots, captions and ``metrics.json``."""
from __future__ import annotations

import numpy as np

from .blip import BLIP
from .files import write_atomic
from .tokenizer import Tokenizer


def new_figure(nrows: int = 1, ncols: int = 1, figsize=(6, 4), grid: bool = False):
    """A matplotlib Figure and its axes (``Figure.subplots(nrows, ncols)``), drawn
    without pyplot, so writing a report never changes the plotting backend or the
    figures of a notebook that calls it. ``grid=True`` always returns a 2-d array
    of axes."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=not grid)


def save_figure(fig, path) -> None:
    """Write the matplotlib figure ``fig`` to ``path`` as a PNG at 110 dpi, atomically."""
    write_atomic(path, lambda file: fig.savefig(file, format="png", dpi=110))


def smooth(values, window: int = 25):
    values = np.asarray(values, dtype=np.float64)
    if len(values) < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def plot_losses(history, path) -> None:
    fig, ax = new_figure(figsize=(7, 4))
    for name in ("itc", "itm", "lm"):
        values = smooth(history[name])
        ax.plot(np.arange(len(values)), values, label=name.upper())
    ax.set_xlabel("step")
    ax.set_ylabel("loss (moving average over 25 steps)")
    ax.set_title("BLIP pretraining losses")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def plot_similarity(sim, path, n: int = 16) -> None:
    fig, ax = new_figure(figsize=(5, 4.3))
    im = ax.imshow(sim[:n, :n], cmap="viridis")
    ax.set_xlabel("caption")
    ax.set_ylabel("image")
    ax.set_title(f"ITC cosine similarity, first {n} test pairs")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    save_figure(fig, path)


def plot_retrieval(images, captions, t2i_scores, path, n_queries: int = 4, top: int = 3) -> None:
    """For a few caption queries, the top images by re-ranked score (green = right)."""
    fig, axes = new_figure(n_queries, top, figsize=(2.2 * top + 3.2, 2.3 * n_queries), grid=True)
    for q in range(n_queries):
        order = np.argsort(-t2i_scores[q])[:top]
        for r, i in enumerate(order):
            ax = axes[q, r]
            ax.imshow(images[i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            colour = "green" if i == q else "red"
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
            ax.set_title(f"rank {r + 1}", fontsize=8)
        axes[q, 0].set_ylabel("\n".join(wrap_text(captions[q], 22)), fontsize=7, rotation=0,
                              ha="right", va="center", labelpad=8)
    fig.suptitle("text-to-image retrieval (green: the right image)")
    fig.tight_layout()
    save_figure(fig, path)


def wrap_text(text: str, width: int) -> list[str]:
    """The words of ``text`` as lines of at most ``width`` characters (a longer
    word gets a line of its own)."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines


def plot_captions(images, generated, truth, path, n: int = 12) -> None:
    cols = 4
    rows = (min(n, len(images)) + cols - 1) // cols
    fig, axes = new_figure(rows, cols, figsize=(3.2 * cols, 3.0 * rows), grid=True)
    for k, ax in enumerate(np.ravel(axes)):
        ax.axis("off")
        if k >= min(n, len(images)):
            continue
        ax.imshow(images[k], interpolation="nearest")
        title = wrap_text("model: " + generated[k], 30) + wrap_text("truth: " + truth[k], 30)
        ax.set_title("\n".join(title), fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def itm_patch_saliency(model: BLIP, tokenizer: Tokenizer, pixels, captions, max_length: int = 30):
    """How much each image patch moves the ITM match logit.

    For each (image, caption) pair: the gradient of the match-minus-no-match
    logit with respect to the image tokens the text cross-attends to, its norm
    per patch, on the patch grid. Returns (N, grid, grid). Uses the model's
    backward; the model's gradients are zeroed afterwards.
    """
    ids, mask = tokenizer.encode(captions, max_length=max_length)
    enc_ids = ids.copy()
    enc_ids[:, 0] = tokenizer.enc_id
    embeds, _ = model.visual_encoder.forward(pixels)
    h, cache = model.text_encoder.forward(enc_ids, mask, embeds)
    logits, c_head = model.itm_head.forward(h[:, 0])
    dlogits = np.zeros_like(logits)
    dlogits[:, 1], dlogits[:, 0] = 1.0, -1.0
    dh = np.zeros_like(h)
    dh[:, 0] = model.itm_head.backward(dlogits, c_head)
    d_embeds = model.text_encoder.backward(dh, cache)
    model.zero_grad()
    grid = model.cfg.vision.grid
    sal = np.linalg.norm(d_embeds[:, 1:], axis=-1)  # drop [CLS]
    return sal.reshape(len(captions), grid, grid)


def plot_itm_heatmaps(images, captions, saliency, path, n: int = 6) -> None:
    n = min(n, len(images))
    fig, axes = new_figure(2, n, figsize=(2.4 * n, 5.2), grid=True)
    size = images.shape[1]
    for k in range(n):
        axes[0, k].imshow(images[k], interpolation="nearest")
        axes[0, k].set_title("\n".join(wrap_text(captions[k], 24)), fontsize=7)
        axes[1, k].imshow(images[k], interpolation="nearest")
        axes[1, k].imshow(saliency[k], cmap="inferno", alpha=0.6, interpolation="bilinear",
                          extent=(-0.5, size - 0.5, size - 0.5, -0.5))
        for ax in axes[:, k]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[1, 0].set_ylabel("ITM gradient\nper patch", fontsize=8)
    fig.suptitle("which patches the image-text matching score depends on")
    fig.tight_layout()
    save_figure(fig, path)
