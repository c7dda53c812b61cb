"""HF vision towers (CLIP, SigLIP, DINOv2): where the blocks are and their attention statistics.

The statistics are side computations from the block's own q/k projections on the block input:
the tower keeps the attention implementation the user chose and no full map is stored.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "vision_blocks", "attention_module", "has_cls_token", "config_patches", "feature_block",
    "vit_attention_stats", "vit_probe_stats", "key_correlation",
]  # fmt: skip


def vision_blocks(tower: nn.Module) -> nn.ModuleList:
    """The encoder blocks of an HF vision tower (CLIPVisionModel, SiglipVisionModel, Dinov2Model...)."""
    root = getattr(tower, "vision_model", tower)
    enc = getattr(root, "encoder", None)
    for name in ("layers", "layer"):
        blocks = getattr(enc, name, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise ValueError(f"cannot find the encoder blocks of vision tower {type(tower).__name__}")


def attention_module(block: nn.Module) -> nn.Module:
    """The attention module of a block: the submodule owning q_proj and k_proj."""
    for mod in block.modules():
        if hasattr(mod, "q_proj") and hasattr(mod, "k_proj"):
            return mod
    raise ValueError(f"cannot find q_proj/k_proj in vision block {type(block).__name__}")


def has_cls_token(tower: nn.Module) -> bool:
    root = getattr(tower, "vision_model", tower)
    emb = getattr(root, "embeddings", None)
    return hasattr(emb, "class_embedding") or hasattr(emb, "cls_token")


def config_patches(vision_config) -> int | None:
    """Patches per image of an HF vision config at its configured input size (CLS excluded), or None."""
    size, patch = getattr(vision_config, "image_size", None), getattr(vision_config, "patch_size", None)
    if not isinstance(size, int) or not isinstance(patch, int) or patch <= 0:
        return None
    return (size // patch) ** 2


@torch.no_grad()
def vit_attention_stats(attn: nn.Module, hidden: torch.Tensor, kind: str) -> torch.Tensor:
    """Head-averaged attention statistics of a ViT block from its input ``hidden`` [U, N, D].

    kind "cls": row of token 0 over all N tokens; "colmean": attention received by every token,
    averaged over all queries. q/k from the block's own projections; scores by ``vtok.kernels``
    (never the whole [N, N] map). Returns [U, N] fp32.
    """
    from vtok.kernels import attention_colmean, attention_rows

    n_heads = attn.config.num_attention_heads
    u, n, d = hidden.shape
    head_dim = d // n_heads
    k = attn.k_proj(hidden).view(u, n, n_heads, head_dim).transpose(1, 2)
    if kind == "cls":
        q = attn.q_proj(hidden[:, :1]).view(u, 1, n_heads, head_dim).transpose(1, 2)
        return attention_rows(q, k, scale=head_dim**-0.5)[:, 0]
    if kind == "colmean":
        q = attn.q_proj(hidden).view(u, n, n_heads, head_dim).transpose(1, 2)
        return attention_colmean(q, k, scale=head_dim**-0.5)
    raise ValueError(f"ViT attention kind={kind!r} must be 'cls' or 'colmean'")


@torch.no_grad()
def key_correlation(keys: torch.Tensor, threshold: float, prefix: int = 0, row_chunk: int = 256) -> torch.Tensor:
    """Per token of keys [U, N, d], the share of the other non-prefix tokens of its row whose key has
    cosine > ``threshold`` with its own; prefix tokens (CLS) are not counted and get 0. fp32 [U, N].

    Row chunks of the similarity are reduced to counts at once (the [N, N] map is never stored)."""
    u, n, _ = keys.shape
    k = torch.nn.functional.normalize(keys[:, prefix:].float(), dim=-1)
    m = k.shape[1]
    out = keys.new_zeros(u, n, dtype=torch.float32)
    if m < 2:
        return out
    for i in range(0, m, row_chunk):
        j = min(m, i + row_chunk)
        hits = (k[:, i:j] @ k.transpose(1, 2) > threshold).sum(-1).float()  # [U, rows]
        self_hit = ((k[:, i:j] * k[:, i:j]).sum(-1) > threshold).float()  # a token is not its own duplicate
        out[:, prefix + i : prefix + j] = (hits - self_hit) / (m - 1)
    return out


@torch.no_grad()
def vit_probe_stats(attn: nn.Module, hidden: torch.Tensor, probe, prefix: int = 0) -> torch.Tensor:
    """A ViT probe (``ViTAttention`` or ``ViTKeyCorrelation``) of the block whose attention is ``attn``,
    from its input ``hidden`` [U, N, D]; ``prefix``: leading non-patch tokens (CLS). [U, N] fp32."""
    if probe.kind == "keycorr":
        return key_correlation(attn.k_proj(hidden), float(probe.threshold), prefix)
    return vit_attention_stats(attn, hidden, probe.kind_for(prefix > 0))


def feature_block(vision_feature_layer, num_blocks: int) -> int | None:
    """0-based index of the deepest tower block whose output feeds the features a VLM takes
    (``vision_feature_layer`` indexes hidden_states: 0 = embeddings, i = after block i-1; a list of
    layers takes its deepest); None when only the embeddings feed them."""
    layers = vision_feature_layer if isinstance(vision_feature_layer, (list, tuple)) else [vision_feature_layer]
    fed = max(int(x) % (num_blocks + 1) for x in layers)
    return fed - 1 if fed > 0 else None
