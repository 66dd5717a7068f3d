"""Heat map of the per-module ranks, layers × module types (the SaLoRA paper's Figure 7)."""
from __future__ import annotations

from .report import DEFAULT_TARGET_MODULES, layer_and_type


def heatmap_title(densities: dict | None) -> str:
    """The heat map's title, with the exported and target densities when they are known: the same
    for the map written at the end of training and for `loraforge ranks --png`."""
    if not densities:
        return "SaLoRA ranks"
    return (f"SaLoRA ranks (density {densities['export_density']:.2f}, "
            f"target {densities['target_density']:.2f})")


EXPORTED = "exported rank"  # the cells' label: the ranks `loraforge export` keeps, not the live gates


def rank_heatmap(ranks: dict[str, int], path: str, r_max: int | None = None, title: str = "SaLoRA ranks",
                 label: str = EXPORTED) -> str | None:
    """Write a PNG of `ranks` (module name -> rank) to `path`; modules without a layer index are left
    out (they are in the rank table).

    Args:
        ranks: module name -> rank shown in its cell.
        path: the PNG file to write.
        r_max: the colour scale's top (default: the largest rank).
        title: the figure's title, also stored as the PNG's Title text.
        label: what the cells are (the colour bar's label, also the PNG's Description text).

    Returns:
        The path, or None when no module has a layer index.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    cells: dict[tuple[str, int], int] = {}
    types: list[str] = []
    for name, rank in ranks.items():
        index, kind = layer_and_type(name)
        if index is None:
            continue
        if kind not in types:
            types.append(kind)
        cells[(kind, index)] = rank
    if not cells:
        return None
    order = {name: i for i, name in enumerate(DEFAULT_TARGET_MODULES)}
    types.sort(key=lambda kind: (order.get(kind, len(order)), kind))
    layers = sorted({i for _, i in cells})
    grid = np.full((len(types), len(layers)), np.nan)
    for (kind, index), rank in cells.items():
        grid[types.index(kind), layers.index(index)] = rank
    vmax = r_max if r_max is not None else max(cells.values())
    # about 1000 x 300 px for 30 layers and 2 module types; wider models shrink the cells, not the page
    fig, ax = plt.subplots(figsize=(min(10.0, max(4.0, 0.3 * len(layers) + 2.0)), max(3.0, 0.4 * len(types) + 1.8)))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="Blues", vmin=0, vmax=max(vmax, 1), aspect="auto")
    for y in range(len(types)):
        for x in range(len(layers)):
            if not np.isnan(grid[y, x]):
                value = int(grid[y, x])
                ax.text(x, y, str(value), ha="center", va="center", fontsize=7,
                        color="white" if value > 0.6 * vmax else "black")
    ax.set_xticks(range(len(layers)), [str(i) for i in layers])
    ax.set_yticks(range(len(types)), types)
    ax.set_xlabel("layer")
    ax.set_ylabel("module type")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=f"{label} (of r={vmax})")
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Title": title, "Description": label})  # readable without OCR
    plt.close(fig)
    return path
