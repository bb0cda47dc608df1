"""The re-ranker's paste augmentation keeps every close candidate's change from its reference."""

from __future__ import annotations

import random

import numpy as np
import torch

from retrieval.paste import MARGIN, agreement, paste_unchanged


def _query(seed=0, size=32):
    """A reference, two candidates that each change one square of it, one other scene."""
    rng = np.random.default_rng(seed)
    reference = torch.from_numpy(rng.integers(0, 255, (3, size, size), dtype=np.uint8))
    near = reference.repeat(2, 1, 1, 1)
    near[0, :, 4:8, 4:8] = 255 - near[0, :, 4:8, 4:8]
    near[1, :, 20:24, 10:14] = 0
    other = torch.from_numpy(rng.integers(0, 255, (1, 3, size, size), dtype=np.uint8))
    return reference, torch.cat([near, other])


def test_agreement_leaves_a_margin_around_every_close_change_and_ignores_other_scenes():
    reference, candidates = _query()
    agree = agreement(reference, candidates)
    for y0, x0 in ((4, 4), (20, 10)):
        assert not agree[y0 - MARGIN:y0 + 4 + MARGIN, x0 - MARGIN:x0 + 4 + MARGIN].any()
    # everything else is free, though the third candidate differs everywhere
    assert int(agree.sum()) == 32 * 32 - 2 * (4 + 2 * MARGIN) ** 2


def test_paste_keeps_each_close_candidate_minus_its_reference():
    queries = [_query(seed) for seed in range(3)]
    sizes = [len(c) for _, c in queries]
    references = torch.cat([r.expand(len(c), -1, -1, -1) for r, c in queries])
    candidates = torch.cat([c for _, c in queries])
    before = (references.clone(), candidates.clone())

    new_refs, new_cands = paste_unchanged(references, candidates, sizes, random.Random(0), odds=1.0)

    assert torch.equal(references, before[0]) and torch.equal(candidates, before[1])  # inputs untouched
    start = 0
    for size in sizes:
        rows = slice(start, start + size)
        start += size
        assert all(torch.equal(new_refs[rows.start], r) for r in new_refs[rows])
        pasted = (new_refs[rows.start] != references[rows.start]).any(dim=0)
        assert pasted.any(), "odds 1 pastes into every query"
        assert not (pasted & ~agreement(references[rows.start], candidates[rows])).any()
        # the same region in the reference and its close candidates
        for row in (rows.start, rows.start + 1):
            assert torch.equal((new_cands[row] != candidates[row]).any(dim=0), pasted)
        close = slice(rows.start, rows.start + 2)
        assert torch.equal(new_cands[close].int() - new_refs[close].int(),
                           candidates[close].int() - references[close].int())
        # the other scene gets the same patch: there it now equals the reference
        region = pasted.expand(3, -1, -1)
        assert torch.equal(new_cands[rows.stop - 1][region], new_refs[rows.start][region])


def test_odds_zero_pastes_nothing():
    reference, candidates = _query()
    refs = reference.expand(len(candidates), -1, -1, -1)
    out = paste_unchanged(refs, candidates, [len(candidates)], random.Random(0), odds=0.0)
    assert out[0] is refs and out[1] is candidates
