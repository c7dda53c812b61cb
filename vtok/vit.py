"""The ``in_vit`` stage: what a method sees in one vision-encoder block (``ViTView``), the merge it returns
(``ViTMerge``), the source map (``ViTSource``), and the arithmetic adapters apply them with, as small pure
functions over tensors. ``ViTView`` documents the method interface.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels

__all__ = [
    "ViTView", "ViTMerge", "ViTSource", "merge_tokens", "remap_assign", "first_source", "source_matrix",
    "regroup_rows", "regroup_index", "check_regroup",
]


@dataclass
class ViTView:
    """What an ``in_vit`` method sees in one block.

    An ``in_vit`` method implements two hooks (adapters call them; they never name a model class):

    * ``vit_schedule(num_blocks) -> list[int]``: how many tokens it removes in each block that
      reaches the encoder's output (0 = leave the block alone; blocks with 0 get no merge hooks).
    * ``in_vit(view: ViTView) -> ViTMerge | None``: at block ``view.block``, after the attention
      residual and before the MLP, which tokens merge into which (or None: nothing this time).

    A method may also implement ``in_vit_pre(view) -> ViTMerge | None``: called at the *input* of every
    block that reaches the output (``view.point == "attn"``, before attention; ``view.metric`` is then the
    block's input states, as TempMe's cross-clip merge uses), where a merge may first concatenate
    neighbouring rows of one video (``ViTMerge.regroup``: frames into clips, see :func:`regroup_rows`).

    and may declare ``prop_attn`` (bool: the adapter adds ``log(size)`` of every key to the attention
    logits of later blocks, as an additive float mask), ``protect_cls`` (bool: the encoder's prefix
    tokens -- class, register, distillation tokens -- are handed over as ``view.protected``) and
    ``trace_source`` (bool: the adapter keeps a :class:`ViTSource` map after every forward). The
    adapter keeps the per-token sizes and the source map.

    block: index of the block among the encoder's blocks (0-based); budget: tokens to remove here
    (from ``vit_schedule``); x: [B, N, C] token states after the attention residual; metric:
    [B, N, d] keys of this block's attention averaged over heads; sizes: [B, N] float, original
    patches per token; protected: the first ``protected`` tokens must survive unchanged; probes:
    ViT attention statistics computed so far in this forward (each aligned with the tokens that
    entered its own block); groups: [B] long, the video each row belongs to (rows of one video are
    contiguous, in frame order; an image is a group of its own); frames_per_row: [B] long, how many
    original frames each row holds now (1 until rows were concatenated); point: "mlp" (after the attention
    residual, ``in_vit``) or "attn" (the block's input, ``in_vit_pre``).
    """

    block: int
    budget: int
    x: torch.Tensor
    metric: torch.Tensor | None
    sizes: torch.Tensor
    protected: int
    probes: dict
    groups: torch.Tensor | None = None
    frames_per_row: torch.Tensor | None = None
    point: str = "mlp"

    def regrouped(self, f: int) -> "ViTView":
        """This view with every ``f`` neighbouring rows of a video concatenated (what the adapter does
        before applying a ``ViTMerge(regroup=f)``): compute the merge on it. ``metric`` follows ``x`` when it
        is ``x`` itself (the attention point), else it is regrouped alongside."""
        groups = self.groups if self.groups is not None else torch.arange(self.x.shape[0], device=self.x.device)
        check_regroup(groups, f)
        same = self.metric is self.x
        x = regroup_rows(self.x, f, self.protected)
        metric = x if same else (None if self.metric is None else regroup_rows(self.metric, f, self.protected))
        fpr = self.frames_per_row if self.frames_per_row is not None else torch.ones_like(groups)
        return ViTView(
            self.block, self.budget, x, metric, regroup_rows(self.sizes.unsqueeze(-1), f, self.protected)[..., 0],
            self.protected * f, self.probes, groups[::f], fpr.view(-1, f).sum(1), self.point,
        )


@dataclass
class ViTMerge:
    """Tokens ``src`` [B, r] merge (size-weighted) into tokens ``dst`` [B, r] of the same block.

    Sources disappear; every other token survives. ``order`` [B, N - r] lists the survivors in
    the order the next block receives them (None: their original order); later position-based
    choices (ToMe's alternating split) depend on it. A destination must not be a source itself.
    ``r`` is the same for every sample, so the batch stays rectangular.
    """

    src: torch.Tensor
    dst: torch.Tensor
    order: torch.Tensor | None = None
    #: at the attention point (``in_vit_pre``) only: first concatenate every ``regroup`` neighbouring rows of
    #: one video into one row (:func:`regroup_rows`); ``src``/``dst``/``order`` index the concatenated rows
    regroup: int = 1
    #: optional [B', N', C] added to the (regrouped) tokens before the merge, e.g. a learned temporal
    #: position embedding (TempMe's ``frame_pos``); gradients flow into it
    add: torch.Tensor | None = None

    @property
    def r(self) -> int:
        return int(self.src.shape[1])

    def kept(self, n: int) -> torch.Tensor:
        """[B, n - r] sorted indices of the surviving tokens (themselves or merge destinations)."""
        if self.order is not None:
            return self.order.sort(dim=1).values
        b = self.src.shape[0]
        alive = torch.ones(b, n, dtype=torch.bool, device=self.src.device)
        alive.scatter_(1, self.src, False)
        ar = torch.arange(n, device=self.src.device)
        # stable compaction: survivors first, in index order
        order = torch.argsort((~alive).long() * n + ar, dim=1)
        return order[:, : n - self.r]

    def output_order(self, n: int) -> torch.Tensor:
        return self.order if self.order is not None else self.kept(n)


@dataclass
class ViTSource:
    """Where the tokens of the last forward through the encoder came from.

    assign: [B, N0] long, for every original token (prefix tokens and patches, in the encoder's
    input order) the index of the output token that holds it; sizes: [B, N] float, how many
    original tokens each output token stands for.
    """

    assign: torch.Tensor
    sizes: torch.Tensor
    #: [B0] long: the output row holding each input row's tokens (None: row b stays row b). Rows of one
    #: video concatenated by a cross-frame merge share an output row; ``assign`` then indexes that row.
    rows: torch.Tensor | None = None

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Per original token, the value of the output token holding it: ``values`` [B, N, ...] (one per
        output token) -> [B0, N0, ...] (ToMe's unmerge)."""
        b, n = values.shape[:2]
        rows = self.rows if self.rows is not None else torch.arange(self.assign.shape[0], device=self.assign.device)
        flat = (rows.to(self.assign.device).unsqueeze(1) * n + self.assign).to(values.device)
        return values.reshape(b * n, *values.shape[2:])[flat.reshape(-1)].reshape(*flat.shape, *values.shape[2:])

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.shape[1])

    def first(self) -> torch.Tensor:
        """[B, N] the smallest original index among each output token's sources."""
        return first_source(self.assign, self.num_tokens)

    def matrix(self) -> torch.Tensor:
        """[B, N, N0] bool: ToMe's dense source map (row t marks the original tokens of token t)."""
        return source_matrix(self.assign, self.num_tokens)


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))


def merge_tokens(x: torch.Tensor, sizes: torch.Tensor, plan: ViTMerge):
    """Size-weighted merge (ToMe's ``merge_wavg``): returns the surviving tokens and their sizes.

    x [B, N, C], sizes [B, N] float. A destination becomes ``sum(x_i * s_i) / sum(s_i)`` over
    itself and its sources; its size becomes ``sum(s_i)``. Accumulates in fp32. The merge is
    :func:`vtok.kernels.merge_weighted` (Triton on CUDA, deterministic; the torch reference
    elsewhere and whenever gradients are needed), which returns the survivors in ``plan.order``.
    """
    n = x.shape[1]
    if not plan.r:
        order = plan.output_order(n)
        s_out = sizes.gather(1, order)
        x_out = _gather_rows(x.float() * sizes.unsqueeze(-1), order) / s_out.unsqueeze(-1)
        return x_out.to(x.dtype), s_out
    order = None if plan.order is None else plan.order.to(x.device)
    x_out, s_out, _ = kernels.merge_weighted(x, sizes, plan.src, plan.dst, order=order)
    return x_out, s_out


def remap_assign(assign: torch.Tensor, plan: ViTMerge, n: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Update a source map ``assign`` [B0, N0] (values in [0, n)) through one merge of [B, n] tokens; ``rows``
    [B0]: the row of the merge each input row is in now (None: row b is row b)."""
    order = plan.output_order(n)
    b = order.shape[0]
    new_pos = torch.empty(b, n, dtype=torch.long, device=order.device)
    new_pos.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand(b, -1))
    if plan.r:
        new_pos.scatter_(1, plan.src, new_pos.gather(1, plan.dst))
    if rows is not None:
        new_pos = new_pos[rows.to(new_pos.device)]
    return new_pos.gather(1, assign)


def check_regroup(groups: torch.Tensor, f: int) -> None:
    """Raise unless every ``f`` neighbouring rows belong to one video (each video's row count a multiple of f)."""
    if f < 1:
        raise ValueError(f"ViTMerge.regroup={f} must be at least 1")
    if int(groups.shape[0]) % f or (f > 1 and not bool((groups.view(-1, f) == groups.view(-1, f)[:, :1]).all())):
        raise ValueError(
            f"a cross-frame merge concatenates every {f} neighbouring frames of one video, but some video here "
            f"has a number of rows that is not a multiple of {f} (row groups {groups.tolist()}); give every video "
            "a frame count divisible by the method's grouping"
        )


def regroup_index(n: int, f: int, protected: int, device=None) -> torch.Tensor:
    """[f, n]: where token j of the k-th of ``f`` concatenated rows lands in the new row of f*n tokens:
    the ``protected`` prefix tokens of every row first (row after row), then each row's other tokens."""
    k = torch.arange(f, device=device).unsqueeze(1)
    j = torch.arange(n, device=device).unsqueeze(0)
    return torch.where(j < protected, k * protected + j, f * protected + k * (n - protected) + (j - protected))


def regroup_rows(x: torch.Tensor, f: int, protected: int) -> torch.Tensor:
    """[B, N, C] -> [B/f, f*N, C]: every f neighbouring rows as one, prefix tokens of all f rows first."""
    b, n = x.shape[:2]
    if f == 1:
        return x
    idx = regroup_index(n, f, protected, x.device).reshape(-1)
    out = torch.empty(b // f, f * n, *x.shape[2:], dtype=x.dtype, device=x.device)
    out[:, idx] = x.reshape(b // f, f * n, *x.shape[2:])
    return out


def first_source(assign: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n]: for every token the smallest original index it holds."""
    b, n0 = assign.shape
    out = torch.full((b, n), n0, dtype=torch.long, device=assign.device)
    return out.scatter_reduce(1, assign, torch.arange(n0, device=assign.device).expand(b, -1), "amin")


def source_matrix(assign: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n, N0] bool one-hot of ``assign`` (dense; for visualisation and small encoders)."""
    b, n0 = assign.shape
    out = torch.zeros(b, n, n0, dtype=torch.bool, device=assign.device)
    out.scatter_(1, assign.unsqueeze(1), True)
    return out
