"""Where the pieces of a ViT block are, per library: HF (CLIP, SigLIP, DINOv2), timm, open_clip.

``*_block_parts(model)`` returns one ``BlockParts`` per block (attention, keys, MLP branch, probe
statistics); ``vtok.adapters.vit.InViTRunner`` installs the ``in_vit`` hooks on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vtok.hf_compat import attn_implementation

from .hf_vision import vision_blocks

__all__ = [
    "BlockParts",
    "attention_stats",
    "hf_block_parts",
    "hf_attn_implementation",
    "timm_block_parts",
    "open_clip_block_parts",
    "HF_BLOCKS",
]


def _mean_heads(args, kwargs, out):
    """Keys [B, H, N, d] (the output of a per-head key norm) -> head-averaged [B, N, d]."""
    return out.mean(1)


def _first_arg(name):
    def get(args, kwargs):
        return args[0] if args else kwargs[name]

    return get


@dataclass
class BlockParts:
    """Where the pieces of one pre-norm ViT block are (``x = x + attn(..); x = x + mlp(norm(x))``).

    attn: the module called with the attention mask keyword ``mask_arg``; mha_heads: set for
    ``nn.MultiheadAttention`` (its float mask is [B*H, N, N]); key_module/key_pre/keys: where the
    keys come from -- ``keys(args, kwargs, output)`` of ``key_module``'s call (its forward pre-hook when
    ``key_pre``) returns them head-averaged, [B, N, d];
    mlp_in: first module of the MLP branch (its first argument is the residual stream);
    branch_end: last module of the MLP branch (its output is added to the residual stream);
    attn_input: (args, kwargs) of the attention call -> its input [B, N, C];
    stats: (hidden, kind, bias) -> [B, N] head-averaged attention statistics (ViT probes);
    qkv: where the query/key/value projections are, for low-rank updates (``install_qkv_lora``):
    ("split", (q, k, v) Linears), ("fused", one Linear with 3C outputs) or ("mha", nn.MultiheadAttention
    with its packed ``in_proj_weight``); None: not known.
    """

    block: nn.Module
    attn: nn.Module
    key_module: nn.Module
    mlp_in: nn.Module
    branch_end: nn.Module
    stats: Callable
    attn_input: Callable = _first_arg("x")
    keys: Callable = _mean_heads
    mask_arg: str = "attn_mask"
    key_pre: bool = False
    mha_heads: int | None = None
    qkv: tuple | None = None


@torch.no_grad()
def attention_stats(q_rows: Callable, k: torch.Tensor, kind: str, scale: float, bias=None, row_chunk: int = 256):
    """Head-averaged attention statistics from keys k [B, H, N, d] and a query-row provider.

    ``q_rows(start, stop)`` -> [B, H, R, d] queries of those rows. kind "cls": row 0; "colmean":
    attention received by every token averaged over all queries (never the whole [N, N] map).
    Without ``bias`` this is ``vtok.kernels``' probes; ``bias`` [B, N] (proportional attention, which
    the kernels do not take) is added to the logits in a chunked torch path. fp32 [B, N].
    """
    if kind not in ("cls", "colmean"):
        raise ValueError(f"ViT attention kind={kind!r} must be 'cls' or 'colmean'")
    if bias is None:  # the plain case is the kernels' probes (Triton on CUDA)
        from vtok.kernels import attention_colmean, attention_rows

        if kind == "cls":
            return attention_rows(q_rows(0, 1), k, scale=scale)[:, 0]
        return attention_colmean(q_rows(0, k.shape[2]), k, scale=scale)
    k = k.float()
    b, _, n, _ = k.shape
    extra = bias.float()[:, None, None, :]

    def probs(q):
        s = q.float() @ k.transpose(-1, -2) * scale
        return torch.softmax(s + extra, -1).mean(1)  # [B, R, N]

    if kind == "cls":
        return probs(q_rows(0, 1))[:, 0]
    total = torch.zeros(b, n, dtype=torch.float32, device=k.device)
    for i in range(0, n, row_chunk):
        total += probs(q_rows(i, min(n, i + row_chunk))).sum(1)
    return total / n


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """[B, N, H*d] -> [B, H, N, d]"""
    b, n, _ = x.shape
    return x.view(b, n, h, -1).transpose(1, 2)


HF_BLOCKS = ("CLIPEncoderLayer", "SiglipEncoderLayer", "Dinov2Layer")


def hf_block_parts(tower: nn.Module) -> list[BlockParts]:
    """Block parts of an HF vision tower (CLIP, SigLIP, DINOv2; also inside a LLaVA model)."""
    parts = []
    for blk in vision_blocks(tower):
        name = type(blk).__name__
        if name in ("CLIPEncoderLayer", "SiglipEncoderLayer"):
            attn, mlp_in, end = blk.self_attn, blk.layer_norm2, blk.mlp
        elif name == "Dinov2Layer":
            # drop_path serves both residual branches; the runner arms it only after norm2
            attn, mlp_in, end = blk.attention, blk.norm2, blk.drop_path
        else:
            raise ValueError(
                f"vtok does not know the block structure of {name}; in_vit methods support HF vision blocks "
                f"{', '.join(HF_BLOCKS)}"
            )
        heads = attn.config.num_attention_heads

        def keys(args, kwargs, out, heads=heads):
            b, n, _ = out.shape
            return out.view(b, n, heads, -1).mean(2)

        def stats(hidden, kind, bias, attn=attn, heads=heads):
            k = _heads(attn.k_proj(hidden), heads)
            q_rows = lambda i, j: _heads(attn.q_proj(hidden[:, i:j]), heads)  # noqa: E731
            return attention_stats(q_rows, k, kind, k.shape[-1] ** -0.5, bias)

        parts.append(
            BlockParts(block=blk, attn=attn, key_module=attn.k_proj, mlp_in=mlp_in, branch_end=end, stats=stats,
                       attn_input=_first_arg("hidden_states"), keys=keys, mask_arg="attention_mask",
                       qkv=("split", (attn.q_proj, attn.k_proj, attn.v_proj)))  # fmt: skip
        )
    return parts


def hf_attn_implementation(tower: nn.Module) -> str | None:
    return attn_implementation(getattr(tower, "config", None))


def timm_block_parts(model: nn.Module) -> list[BlockParts]:
    """Block parts of a timm ``VisionTransformer`` (pre-norm ``Block`` with ``Attention``)."""
    from timm.models.vision_transformer import Attention, Block

    parts = []
    for i, blk in enumerate(model.blocks):
        if type(blk).forward is not Block.forward or type(blk.attn).forward is not Attention.forward:
            raise ValueError(
                f"vtok's timm adapter supports VisionTransformer blocks of type Block with Attention; block {i} is "
                f"{type(blk).__name__} with {type(getattr(blk, 'attn', None)).__name__}"
            )
        attn = blk.attn

        def stats(hidden, kind, bias, attn=attn):
            b, n, _ = hidden.shape
            qkv = attn.qkv(hidden).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
            return attention_stats(lambda i, j: q[:, :, i:j], k, kind, attn.scale, bias)

        parts.append(BlockParts(block=blk, attn=attn, key_module=attn.k_norm, mlp_in=blk.norm2,
                                branch_end=blk.drop_path2, stats=stats, qkv=("fused", attn.qkv)))  # fmt: skip
    return parts


def _mha_qk(mha: nn.MultiheadAttention, x: torch.Tensor, which: int) -> torch.Tensor:
    """Query (0) or key (1) projection of ``nn.MultiheadAttention`` for input x [B, N, C] -> [B, H, N, d]."""
    c = mha.embed_dim
    if mha._qkv_same_embed_dim:
        w = mha.in_proj_weight[which * c : (which + 1) * c]
    else:
        w = mha.q_proj_weight if which == 0 else mha.k_proj_weight
    bias = None if mha.in_proj_bias is None else mha.in_proj_bias[which * c : (which + 1) * c]
    return _heads(F.linear(x, w, bias), mha.num_heads)


def open_clip_block_parts(tower: nn.Module) -> list[BlockParts]:
    """Block parts of an open_clip ``VisionTransformer`` (``nn.MultiheadAttention`` or custom blocks)."""
    from open_clip.transformer import Attention, CustomResidualAttentionBlock, ResidualAttentionBlock

    parts = []
    for i, blk in enumerate(tower.transformer.resblocks):
        if type(blk).forward is ResidualAttentionBlock.forward and not hasattr(blk, "ln_1_kv"):
            mha = blk.attn
            if not mha.batch_first:
                raise ValueError(
                    "vtok's open_clip adapter needs batch-first blocks (the default); this model's "
                    "nn.MultiheadAttention has batch_first=False"
                )

            def keys(args, kwargs, out, mha=mha):
                x = args[0] if args else kwargs["query"]
                return _mha_qk(mha, x, 1).mean(1)

            def stats(hidden, kind, bias, mha=mha):
                k = _mha_qk(mha, hidden, 1)
                q_rows = lambda i, j: _mha_qk(mha, hidden[:, i:j], 0)  # noqa: E731
                return attention_stats(q_rows, k, kind, k.shape[-1] ** -0.5, bias)

            parts.append(
                BlockParts(block=blk, attn=mha, key_module=mha, mlp_in=blk.ln_2, branch_end=blk.ls_2, stats=stats,
                           attn_input=_first_arg("query"), keys=keys, key_pre=True,
                           mha_heads=mha.num_heads, qkv=("mha", mha) if mha._qkv_same_embed_dim else None)  # fmt: skip
            )
        elif (
            type(blk).forward is CustomResidualAttentionBlock.forward
            and type(blk.attn).forward is Attention.forward
            and blk.attn.logit_scale is None
        ):
            attn = blk.attn

            def stats(hidden, kind, bias, attn=attn):
                q, k, _ = F.linear(hidden, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
                q, k = attn.ln_q(_heads(q, attn.num_heads)), attn.ln_k(_heads(k, attn.num_heads))
                return attention_stats(lambda i, j: q[:, :, i:j], k, kind, attn.scale, bias)

            parts.append(BlockParts(block=blk, attn=attn, key_module=attn.ln_k, mlp_in=blk.ln_2,
                                    branch_end=blk.ls_2, stats=stats))  # fmt: skip  (qkv: a functional projection)
        else:
            raise ValueError(
                f"vtok's open_clip adapter supports ResidualAttentionBlock (self-attention) and "
                f"CustomResidualAttentionBlock without scaled cosine attention; block {i} is {type(blk).__name__}"
            )
    return parts
