"""The balanced batch sampler: shuffled train pages, dealt so that every loss term gets a signal.

Each loss term is an exact zero when its batch has nothing to work on. The contrastive and
reconstruction terms need a page with at least 2 panels, and the alignment term needs 2 panels with
text. With a small batch or a dataset rich in single-panel or text-free pages, plain shuffling leaves
many steps without one of them. The balanced sampler deals each epoch's shuffled pages into batches so
that every batch gets at least ``min_multi_panel_pages`` pages with 2 or more panels (capped at the
batch's size) and ``min_text_panels`` panels with text, wherever the train split allows it.

An epoch still visits every train page exactly once, in batches of the same sizes as
``trainer.data.iterate_batches`` (full batches, then a smaller last one). The plan of an epoch depends
only on the seed and the epoch number, so a resumed run draws the same batches as an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

# Donor batches tried per batch that is short of text panels, to bound the repair pass on data that
# cannot meet the minimum anyway.
MAX_DONOR_TRIES = 64


@dataclass(frozen=True)
class Shortfall:
    """Batches of one epoch that missed a minimum, out of ``batches``."""

    epoch: int
    batches: int
    short_multi_panel: int
    short_text: int

    def __bool__(self) -> bool:
        return bool(self.short_multi_panel or self.short_text)


def page_signal_counts(dataset, page_indices: Sequence[int]) -> tuple[list[int], list[int]]:
    """Return the panel count and the count of panels with text of each page in ``page_indices``."""
    panels = [len(dataset.pages[index].panels) for index in page_indices]
    text_panels = [sum(panel.has_text for panel in dataset.pages[index].panels) for index in page_indices]
    return panels, text_panels


class BalancedBatchSampler:
    """Yields each epoch's train batches as lists of page indices, with per-batch signal minimums.

    ``panel_counts[i]`` and ``text_counts[i]`` describe page ``page_indices[i]``. Call ``set_epoch``
    before iterating. The plan of an epoch is built in four passes over the shuffled pages:

    1. pages with 2 or more panels are dealt round robin until every batch has its minimum of them,
    2. batches short of text panels take the next pages with text, round robin,
    3. the remaining pages fill the remaining places in shuffled order,
    4. a batch still short of text panels swaps pages with a batch that has text panels to spare,
       when the swap keeps both batches' minimums.

    The multi-panel minimum is met in every batch whenever the split has enough such pages in total.
    The text minimum is met greedily. NOTE: in rare layouts passes 2 and 4 can miss an arrangement
    that exists, and the batch then counts in the shortfall. Batches that miss a minimum are counted
    in ``shortfall`` after each epoch, and the first such epoch is logged as a warning once.
    """

    def __init__(
        self,
        page_indices: Sequence[int],
        panel_counts: Sequence[int],
        text_counts: Sequence[int],
        batch_size: int,
        min_multi_panel_pages: int = 2,
        min_text_panels: int = 2,
        seed: int = 0,
        warn: bool = True,
    ):
        if not len(page_indices) == len(panel_counts) == len(text_counts):
            raise ValueError(
                f"page_indices, panel_counts and text_counts differ in length "
                f"({len(page_indices)}, {len(panel_counts)}, {len(text_counts)})"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if min_multi_panel_pages < 0 or min_text_panels < 0:
            raise ValueError("the per-batch minimums must be zero or more")
        self.pages = np.asarray(page_indices, dtype=np.int64)
        self.multi_panel = np.asarray(panel_counts, dtype=np.int64) >= 2
        self.text_counts = np.asarray(text_counts, dtype=np.int64)
        self.batch_size = batch_size
        self.min_multi_panel_pages = min_multi_panel_pages
        self.min_text_panels = min_text_panels
        self.seed = seed
        self.warn = warn
        self.epoch = 0
        self.shortfall: Shortfall | None = None
        self._warned = False

    def __len__(self) -> int:
        return -(-len(self.pages) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields."""
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])

    def __iter__(self) -> Iterator[list[int]]:
        batches, self.shortfall = self.plan_epoch(self.epoch)
        if self.shortfall and self.warn and not self._warned:
            self._warned = True
            log.warning(self.describe_shortfall())
        for batch in batches:
            yield [int(self.pages[position]) for position in batch]

    def describe_shortfall(self) -> str:
        """Return one line on the last planned epoch's batches that missed a minimum, and why."""
        shortfall = self.shortfall
        if not shortfall:
            return "balanced sampler: every batch met its minimums"
        parts = []
        if shortfall.short_multi_panel:
            parts.append(
                f"{shortfall.short_multi_panel} have fewer than {self.min_multi_panel_pages} pages with 2+ panels "
                f"(the train split has {int(self.multi_panel.sum())} such pages)"
            )
        if shortfall.short_text:
            parts.append(
                f"{shortfall.short_text} have fewer than {self.min_text_panels} panels with text "
                f"(the train split has {int(self.text_counts.sum())})"
            )
        return (
            f"balanced sampler: of the {shortfall.batches} batches of epoch {shortfall.epoch} "
            f"with {self.batch_size} pages, {' and '.join(parts)}; raise optim.batch_size or lower "
            "data.min_multi_panel_pages / data.min_text_panels (this warning is shown once)"
        )

    # ----------------------------------------------------------------------------------------------
    # Planning

    def plan_epoch(self, epoch: int) -> tuple[list[list[int]], Shortfall]:
        """Return the batches of ``epoch`` as lists of positions into ``page_indices``, and the shortfall."""
        rng = np.random.default_rng([self.seed % 2**63, epoch])
        count = len(self.pages)
        sizes = [self.batch_size] * (count // self.batch_size)
        if count % self.batch_size:
            sizes.append(count % self.batch_size)
        plan = _EpochPlan(sizes, self.multi_panel, self.text_counts, self.min_multi_panel_pages, self.min_text_panels)

        order = rng.permutation(count)
        plan.deal_multi_panel_pages(order)
        plan.deal_text_pages(order)
        plan.fill(order)
        plan.repair_text(rng)

        # Pages are dealt round robin from the first batch, so any shortfall gathers in the last batches.
        # Shuffling the full batches spreads it, and the smaller last batch stays last, as in iterate_batches.
        full = [index for index, size in enumerate(sizes) if size == self.batch_size]
        batch_order = [full[index] for index in rng.permutation(len(full))]
        batch_order += [index for index, size in enumerate(sizes) if size != self.batch_size]
        batches = [plan.members[index] for index in batch_order]
        shortfall = Shortfall(
            epoch=epoch,
            batches=len(sizes),
            short_multi_panel=sum(plan.multi[k] < plan.multi_quota[k] for k in range(len(sizes))),
            short_text=sum(plan.text[k] < self.min_text_panels for k in range(len(sizes))),
        )
        return batches, shortfall


class _EpochPlan:
    """Batches under construction: their members (positions into the page list) and running counts."""

    def __init__(self, sizes, multi_panel, text_counts, min_multi_panel_pages, min_text_panels):
        self.sizes = sizes
        # Arrays select pages in bulk, and the lists make per-page lookups cheap.
        self.is_multi = multi_panel
        self.text_counts = text_counts
        self.multi_list = multi_panel.tolist()
        self.text_list = text_counts.tolist()
        self.min_text = min_text_panels
        self.multi_quota = [min(min_multi_panel_pages, size) for size in sizes]
        self.members: list[list[int]] = [[] for _ in sizes]
        self.multi = [0] * len(sizes)
        self.text = [0] * len(sizes)
        self.assigned = np.zeros(len(multi_panel), dtype=bool)

    def add(self, batch: int, position: int) -> None:
        position = int(position)
        self.members[batch].append(position)
        self.multi[batch] += self.multi_list[position]
        self.text[batch] += self.text_list[position]
        self.assigned[position] = True

    def has_room(self, batch: int) -> bool:
        return len(self.members[batch]) < self.sizes[batch]

    def deal_multi_panel_pages(self, order: np.ndarray) -> None:
        available = deque(order[self.is_multi[order]])
        for _ in range(max(self.multi_quota, default=0)):
            for batch, quota in enumerate(self.multi_quota):
                if available and self.multi[batch] < quota:
                    self.add(batch, available.popleft())

    def deal_text_pages(self, order: np.ndarray) -> None:
        available = deque(position for position in order[self.text_counts[order] > 0] if not self.assigned[position])
        waiting = [batch for batch in range(len(self.sizes)) if self.text_short(batch) and self.has_room(batch)]
        while waiting and available:
            still_waiting = []
            for batch in waiting:
                if not available:
                    break
                self.add(batch, available.popleft())
                if self.text_short(batch) and self.has_room(batch):
                    still_waiting.append(batch)
            waiting = still_waiting

    def fill(self, order: np.ndarray) -> None:
        remaining = iter(position for position in order if not self.assigned[position])
        for batch in range(len(self.sizes)):
            while self.has_room(batch):
                self.add(batch, next(remaining))

    def text_short(self, batch: int) -> bool:
        return self.text[batch] < self.min_text

    def repair_text(self, rng: np.random.Generator) -> None:
        batches = len(self.sizes)
        for batch in range(batches):
            tries = 0
            while self.text_short(batch) and tries < MAX_DONOR_TRIES:
                tries += 1
                donor = int(rng.integers(batches))
                if donor != batch and self.text[donor] > self.min_text:
                    self.swap_for_text(batch, donor)

    def swap_for_text(self, batch: int, donor: int) -> bool:
        """Swap one page of ``batch`` for one of ``donor`` with more text, keeping both batches' minimums."""
        for donor_slot, incoming in enumerate(self.members[donor]):
            for slot, outgoing in enumerate(self.members[batch]):
                gain = self.text_list[incoming] - self.text_list[outgoing]
                multi_change = int(self.multi_list[incoming]) - int(self.multi_list[outgoing])
                if gain <= 0 or self.text[donor] - gain < self.min_text:
                    continue
                if not self._keeps_multi_quota(batch, multi_change) or not self._keeps_multi_quota(donor, -multi_change):
                    continue
                self.members[batch][slot], self.members[donor][donor_slot] = incoming, outgoing
                self.text[batch] += gain
                self.text[donor] -= gain
                self.multi[batch] += multi_change
                self.multi[donor] -= multi_change
                return True
        return False

    def _keeps_multi_quota(self, batch: int, change: int) -> bool:
        # A batch that met its multi-panel minimum keeps it, and one short of it gets no further from it.
        return self.multi[batch] + change >= min(self.multi_quota[batch], self.multi[batch])
