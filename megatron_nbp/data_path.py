"""The ``data_path`` setting (Megatron-LM's ``--data-path``): ``[DIR]`` or weight-folder pairs
``[W1, DIR1, W2, DIR2, ...]``; blended by :mod:`megatron_nbp.data_blend`. Imports nothing of the
package, so the config can check it."""

from __future__ import annotations

import math
from typing import Sequence


def parse_data_path(data_path: Sequence[str | float]) -> list[tuple[float, str]]:
    """``[DIR]`` -> ``[(1.0, DIR)]``; ``[W1, DIR1, W2, DIR2, ...]`` -> ``[(w1, DIR1), ...]`` with the weights
    normalised to sum to 1 (Megatron-LM's ``--data-path`` forms).

    Raises:
        ValueError: an empty list, an odd number of entries (> 1), a weight that is not a positive
            finite number, or a folder that is empty text; the message names the bad entry.
    """
    items = [str(x).strip() for x in data_path]
    if len(items) == 1:
        if not items[0]:
            raise ValueError("data_path: the folder is empty text")
        return [(1.0, items[0])]
    if not items or len(items) % 2:
        raise ValueError(f"data_path {list(data_path)} must be [DIR] or weight-folder pairs "
                         f"[W1, DIR1, W2, DIR2, ...] ({len(items)} entries given)")
    pairs = []
    for weight, folder in zip(items[0::2], items[1::2]):
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"data_path: weight {weight!r} (before folder {folder!r}) is not a number") from None
        if not math.isfinite(w) or w <= 0:
            raise ValueError(f"data_path: weight {weight!r} of folder {folder!r} must be a positive number")
        if not folder:
            raise ValueError(f"data_path: the folder after weight {weight!r} is empty text")
        pairs.append((w, folder))
    total = sum(w for w, _ in pairs)
    return [(w / total, folder) for w, folder in pairs]
