"""Data-parallel training over several processes started by ``torchrun``.

``torchrun --nproc_per_node N -m trainer fit ...`` starts N processes (ranks) that train one run.
A single process needs none of this: every helper here is then a no-op or returns its input.

Batches. Every rank draws the same global batches of pages, because the shuffle generators and the
balanced sampler are seeded alike on every rank. Each rank takes a contiguous slice of each batch's
pages, so the global batch matches the batch of a one-process run with the same ``optim.batch_size``.

Objectives. By default each rank computes the objectives over its own slice and
``DistributedDataParallel`` averages the gradients, so negatives come from the rank's slice only.
With ``objectives.gather = true`` each rank gathers the fused, image-only and text-only embeddings
of the whole global batch and computes the objectives over all of it. The gathered copy of another
rank's rows carries no gradient, so a rank's gradient reaches only its own rows. Its loss is the
whole batch's loss, so the gradient of its own rows is exact, and it is multiplied by the world
size before DDP averages. The averaged gradient then equals the one-process gradient, up to float
rounding. Two things still differ from one process: dropout masks are drawn per rank, so the runs
match only with ``model.dropout = 0`` and ``objectives.reconstruction_dropout = 0``, and the legacy
preset's unseeded validation masks come from each rank's global generator.

Validation. Each rank embeds its slice of every validation batch, the slices are gathered on every
rank, and every rank computes the objectives over the whole batch. So all ranks hold the same
validation loss and take the same best-checkpoint decision. Rank 0 alone writes the run directory.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trainer.config import TrainerError
from trainer.model import PanelEmbeddings

# Collective calls wait this long for the slowest rank. Rank 0 alone fills the feature cache while the
# other ranks wait at a barrier, which takes far longer than torch's 10-minute NCCL default on a large
# dataset with an empty cache.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=2)

# Rank r > 0 reseeds its global generators with seed + r * RANK_SEED_STRIDE after the model is built,
# so that dropout masks differ between ranks. DDP copies rank 0's initial weights to every rank.
RANK_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job. The defaults describe a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # "gloo" (CPU) or "nccl" (CUDA); None for a single process.
    backend: str | None = None
    # The rank's training device, also used for the tensors of collective calls.
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # False when the caller had already initialised the process group, which it then also destroys.
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ----------------------------------------------------------------------------------------------
    # Batches

    def shard(self, pages: Sequence[int]) -> list[int]:
        """Return this rank's contiguous slice of a global batch of pages (it may be empty)."""
        bounds = shard_bounds(len(pages), self.world_size)
        return list(pages[bounds[self.rank]: bounds[self.rank + 1]])

    def panel_counts(self, pages: Sequence[int], offsets: Sequence[int]) -> list[int]:
        """Return the number of panels in each rank's slice of ``pages``.

        ``offsets`` is ``PanelDataset.panel_offsets()``: page i owns panels offsets[i] .. offsets[i + 1] - 1.
        """
        bounds = shard_bounds(len(pages), self.world_size)
        return [
            sum(offsets[page + 1] - offsets[page] for page in pages[bounds[rank]: bounds[rank + 1]])
            for rank in range(self.world_size)
        ]

    # ----------------------------------------------------------------------------------------------
    # Collectives

    def gather_rows(self, tensor: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Concatenate every rank's rows in rank order, where ``counts[r]`` is the row count of rank r.

        The result carries no gradient. Rows are padded to the longest slice, because
        ``all_gather`` needs tensors of one shape.
        """
        if not self.enabled:
            return tensor
        import torch.distributed as torch_dist

        longest = max(counts)
        if longest == 0:
            return tensor
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor.detach()
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        torch_dist.all_gather(parts, padded)
        return torch.cat([part[:count] for part, count in zip(parts, counts)])

    def gather_with_local_grad(self, tensor: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Gather every rank's rows, keeping the gradient of this rank's own rows, multiplied by the world size.

        Each rank computes the same loss over the gathered rows, so the gradient of its own rows is
        exact, and DDP divides it by the world size when it averages the ranks' gradients.
        """
        if not self.enabled:
            return tensor
        gathered = self.gather_rows(tensor, counts)
        start = sum(counts[: self.rank])
        stop = start + counts[self.rank]
        local = _ScaleGradient.apply(tensor, float(self.world_size))
        return torch.cat([gathered[:start], local, gathered[stop:]])

    def gather_embeddings(self, embeddings: PanelEmbeddings, counts: Sequence[int]) -> PanelEmbeddings:
        """Gather the fused, image-only and text-only rows of every rank (no gradient), for validation."""
        return PanelEmbeddings(
            fused=self.gather_rows(embeddings.fused, counts),
            vision=self.gather_rows(embeddings.vision, counts),
            text=self.gather_rows(embeddings.text, counts),
        )

    def any_true(self, flags: Sequence[bool]) -> list[bool]:
        """Return, for each flag, whether it is true on at least one rank."""
        if not self.enabled:
            return [bool(flag) for flag in flags]
        import torch.distributed as torch_dist

        values = torch.tensor([float(bool(flag)) for flag in flags], dtype=torch.float32, device=self.device)
        torch_dist.all_reduce(values, op=torch_dist.ReduceOp.MAX)
        return [bool(value) for value in values.tolist()]

    def sum(self, values: Sequence[float]) -> list[float]:
        """Return the sum over ranks of each value, computed in float64."""
        if not self.enabled:
            return [float(value) for value in values]
        import torch.distributed as torch_dist

        totals = torch.tensor([float(value) for value in values], dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(totals, op=torch_dist.ReduceOp.SUM)
        return totals.tolist()

    def gather_objects(self, value: Any) -> list[Any]:
        """Return every rank's ``value`` (any picklable object), in rank order."""
        if not self.enabled:
            return [value]
        import torch.distributed as torch_dist

        values: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as torch_dist

            torch_dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block on rank 0 first and on the other ranks after it has finished.

        Used for work whose result rank 0 leaves on disk, such as the feature cache. When rank 0
        raises, the other ranks stay at the barrier until torchrun stops the job.
        """
        if self.enabled and not self.is_main:
            self.barrier()
        yield
        if self.enabled and self.is_main:
            self.barrier()

    def wrap(self, module: nn.Module) -> nn.Module:
        """Wrap ``module`` in DistributedDataParallel when there are several ranks; return it unchanged otherwise."""
        if not self.enabled:
            return module
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters: the reconstruction head gets no gradient in a batch without a page of
        # 2 or more panels. Buffers are not synced before each forward pass, because no trained module
        # has buffers that change (GroupNorm and LayerNorm have none, and frozen backbones stay in eval
        # mode). torch 2.13 renamed broadcast_buffers to forward_sync_buffers.
        options: dict[str, Any] = {"find_unused_parameters": True}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
            options["forward_sync_buffers"] = False
        else:
            options["broadcast_buffers"] = False
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, **options)


def shard_bounds(count: int, world_size: int) -> list[int]:
    """Return ``world_size + 1`` bounds that split ``count`` items into near-equal contiguous slices."""
    return [count * rank // world_size for rank in range(world_size + 1)]


class _ScaleGradient(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by ``scale`` in the backward pass."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


# --------------------------------------------------------------------------------------------------
# Setup and teardown


def initialize(device: torch.device) -> Distributed:
    """Join the torchrun job described by the environment, or describe a single process.

    ``device`` is the configured device. Under torchrun a CUDA device becomes the GPU of the
    rank's ``LOCAL_RANK`` and the backend is NCCL; a CPU device uses gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(device=device)

    import torch.distributed as torch_dist

    if not torch_dist.is_available():
        raise TrainerError("WORLD_SIZE > 1, but this build of torch has no torch.distributed support")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        if device.index is not None:
            raise TrainerError(
                f"device: {device} would put every rank on one GPU; under torchrun set device to "
                '"cuda" or "auto", so that each rank takes the GPU numbered by its LOCAL_RANK'
            )
        if local_rank >= torch.cuda.device_count():
            raise TrainerError(
                f"LOCAL_RANK {local_rank} has no GPU: torch sees {torch.cuda.device_count()}; "
                "start at most that many processes per host"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"

    owns_group = not torch_dist.is_initialized()
    if owns_group:
        torch_dist.init_process_group(backend=backend, timeout=PROCESS_GROUP_TIMEOUT)
    elif torch_dist.get_world_size() != world_size:
        raise TrainerError(
            f"the process group has {torch_dist.get_world_size()} ranks, but WORLD_SIZE is {world_size}"
        )
    return Distributed(rank, world_size, local_rank, backend, device, owns_group)


def shutdown(dist: Distributed, finished: bool = False) -> None:
    """Destroy the process group if ``initialize`` created it.

    The caller releases its DistributedDataParallel wrapper first, because the wrapper references the
    process group. A gloo group that survives until interpreter exit can abort the process during
    finalisation ("terminate called without an active exception", seen with torch 2.13 under load).
    With ``finished`` every rank first waits at a barrier, so no rank exits while rank 0 is still
    writing the run directory. After an error there is no barrier, because other ranks may never reach it.
    """
    if not (dist.enabled and dist.owns_group):
        return
    import gc

    import torch.distributed as torch_dist

    if not torch_dist.is_initialized():
        return
    gc.collect()
    if finished:
        torch_dist.barrier()
    torch_dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# The training forward pass


@dataclass
class BatchLabels:
    """Page position and text flag of every panel of a global batch, and the panel count of each rank's slice."""

    page: torch.Tensor
    has_text: torch.Tensor
    counts: list[int]


def batch_labels(
    page_indices: Sequence[int], offsets: Sequence[int], has_text: torch.Tensor, dist: Distributed,
    device: torch.device,
) -> BatchLabels:
    """Build the labels of the global batch ``page_indices`` in the panel order of ``PanelInputs.batch``.

    ``offsets`` and ``has_text`` are ``PanelInputs.offsets`` and ``PanelInputs.has_text``.
    """
    flat: list[int] = []
    page: list[int] = []
    for position, page_index in enumerate(page_indices):
        start, stop = offsets[page_index], offsets[page_index + 1]
        flat.extend(range(start, stop))
        page.extend([position] * (stop - start))
    return BatchLabels(
        page=torch.tensor(page, dtype=torch.long, device=device),
        has_text=has_text[torch.tensor(flat, dtype=torch.long)].to(device),
        counts=dist.panel_counts(page_indices, offsets),
    )


class TrainingLoss(nn.Module):
    """The encoder and the objectives as one module, so that DistributedDataParallel can wrap both.

    ``forward`` runs the encoder on a rank's batch under ``autocast`` and returns the objectives'
    output. With ``labels`` (``objectives.gather``) the objectives cover the whole global batch:
    the embeddings of every rank are gathered first, and the loss is the one a single process
    computes on that batch.
    """

    def __init__(
        self,
        model: nn.Module,
        objectives: nn.Module,
        dist: Distributed,
        autocast: Callable[[], AbstractContextManager],
    ):
        super().__init__()
        self.model = model
        self.objectives = objectives
        self.dist = dist
        self.autocast = autocast

    def forward(self, batch, generator: torch.Generator | None, labels: BatchLabels | None = None):
        with self.autocast():
            embeddings = self.model(batch)
        if labels is None:
            return self.objectives(embeddings, batch.page, batch.has_text, generator)

        gathered = PanelEmbeddings(
            fused=self.dist.gather_with_local_grad(embeddings.fused, labels.counts),
            vision=self.dist.gather_with_local_grad(embeddings.vision, labels.counts),
            text=self.dist.gather_with_local_grad(embeddings.text, labels.counts),
        )
        return self.objectives(gathered, labels.page, labels.has_text, generator)


def reduce_step_values(dist: Distributed, output, gathered: bool) -> tuple[float, dict[str, dict[str, float | int]]]:
    """Return the step's loss and component record as logged for the whole global batch.

    With gathered objectives every rank already has the global values. Otherwise the loss and
    component values are means over ranks (the loss whose gradient DDP's average follows) and the
    active counts are sums.
    """
    loss = float(output.total.detach())
    components = output.component_record()
    if gathered or not dist.enabled:
        return loss, components

    names = list(components)
    values = [loss] + [components[name]["value"] for name in names] + [components[name]["active"] for name in names]
    totals = dist.sum(values)
    world = dist.world_size
    for index, name in enumerate(names):
        components[name]["value"] = totals[1 + index] / world
        components[name]["active"] = int(round(totals[1 + len(names) + index]))
    return totals[0] / world, components
