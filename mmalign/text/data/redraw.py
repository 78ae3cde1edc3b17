"""Re-drawing group members from a larger pool at every visit (thesis §3.5.2, SPEC §3; issue #17).

mIPO's variance correction ``− s_w²/k − s_l²/k`` makes its loss an unbiased estimate of the population loss
only when the ``k`` members are i.i.d. draws from the chosen and rejected distributions (Proposition 1), and the
thesis' stochastic estimator presumes *fresh* draws. A fixed group, reused at every step, is one draw frozen in
place: the correction then rewards spreading the log-ratios inside that group. :class:`RedrawGroups` stores a
pool of members per prompt (pools may be ragged) and hands out ``k`` members drawn **with replacement** from
each pool every time the example is visited.

The draw is a pure function of ``(seed, epoch, example index)`` (a counter-based generator, no hidden state), so
it is deterministic under the seed and a run resumed mid-epoch re-draws exactly what an uninterrupted run drew;
the dataset learns the epoch through :meth:`RedrawGroups.set_epoch`, which accelerate's prepared DataLoader
calls on a dataset that has one (tests/text/test_redraw.py checks that every epoch is seen). Precomputed
reference log-probs cover the whole pool (``pools``) and are picked with the members.

Used through ``data.redraw_members: k`` of the preference recipe (``mmalign.text.train``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from mmalign.text.data.tokenization import TokenizedPreferenceDataset

__all__ = ["RedrawGroups", "maybe_redraw"]

_PER_MEMBER = ("chosen_ids", "ref_chosen"), ("rejected_ids", "ref_rejected")


class RedrawGroups(TokenizedPreferenceDataset):
    """Pools of members per example; item ``i`` holds ``k`` members of each pool drawn with replacement."""

    def __init__(self, pools: TokenizedPreferenceDataset, members: int, seed: int):
        if members < 1:
            raise ValueError(f"data.redraw_members: invalid value {members!r}; expected an integer >= 1")
        super().__init__(pools.items, source=pools.source, data_format=pools.data_format)
        self.pools = pools  # the full pools (reference precomputation, fingerprints)
        self.members = members
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def max_group_sizes(self) -> tuple[int, int]:
        return self.members, self.members

    def draw_indices(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The pool positions of the chosen and rejected members used for example ``index`` in this epoch."""
        item = self.items[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return (rng.integers(0, len(item["chosen_ids"]), size=self.members),
                rng.integers(0, len(item["rejected_ids"]), size=self.members))

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        out = dict(item)
        for picks, keys in zip(self.draw_indices(index), _PER_MEMBER):
            for key in keys:
                if key in item:
                    out[key] = [item[key][j] for j in picks]
        return out


def maybe_redraw(dataset: TokenizedPreferenceDataset, members: int | None, seed: int) -> TokenizedPreferenceDataset:
    """``dataset`` itself when ``members`` is None, else a :class:`RedrawGroups` over its groups as pools."""
    return dataset if members is None else RedrawGroups(dataset, members, seed)
