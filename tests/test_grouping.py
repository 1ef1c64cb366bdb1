"""The one "group by size" helper (ops/grouping.py) and its users keep first-seen group order and input order."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from cloaklab.ops.grouping import group_indices_by, shape_of
from cloaklab.ops.runner import same_size_groups


def test_groups_keep_first_seen_order_and_input_order():
    images = [torch.zeros(3, 4, 6), torch.zeros(3, 8, 8), torch.zeros(3, 4, 6), torch.zeros(3, 8, 8),
              torch.zeros(3, 2, 2)]
    assert group_indices_by(images, shape_of) == {(3, 4, 6): [0, 2], (3, 8, 8): [1, 3], (3, 2, 2): [4]}
    assert list(group_indices_by(images, shape_of)) == [(3, 4, 6), (3, 8, 8), (3, 2, 2)]
    assert group_indices_by([], shape_of) == {}


def test_runner_groups_jobs_by_image_size():
    jobs = [SimpleNamespace(name=n, image=SimpleNamespace(size=s))
            for n, s in (("a", (64, 48)), ("b", (32, 32)), ("c", (64, 48)))]
    assert [[job.name for job in group] for group in same_size_groups(jobs)] == [["a", "c"], ["b"]]
