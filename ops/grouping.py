"""Grouping of batch members by a key (stdlib only): the one helper behind "same-size images share a batch" in the
folder runner (:func:`ops.runner.same_size_groups`), the metrics (``preprocess``, FID, LPIPS) and the set-level
attacks' minibatches (:meth:`ops.attacks.setlevel.ProtectedSet.groups`)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Any


def group_indices_by(items: Iterable[Any], key: Callable[[Any], Hashable]) -> dict[Hashable, list[int]]:
    """Indices of ``items`` grouped by ``key(item)``: groups in first-seen order, indices ascending within a group.

    >>> group_indices_by(["ab", "c", "de", "f"], len)
    {2: [0, 2], 1: [1, 3]}
    """
    groups: dict[Hashable, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(key(item), []).append(index)
    return groups


def shape_of(tensor: Any) -> tuple[int, ...]:
    """A tensor's full shape as a hashable key (images ``(3, H, W)`` group by size)."""
    return tuple(tensor.shape)
