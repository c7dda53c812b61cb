"""The model and dataset names ``vtok eval`` resolves (``MODELS``, ``DATASETS``, ``register_*``), the dataset
protocol of the comparison runner (``register_dataset``) and ``SyntheticDataset`` for the tiny test models.
"""

from __future__ import annotations

import random
from typing import Callable

import torch

__all__ = [
    "SyntheticDataset",
    "MODELS",
    "DATASETS",
    "register_model",
    "register_dataset",
    "load_model",
    "load_dataset",
    "first_output",
]

#: name -> factory() returning a model (eval mode)
MODELS: dict[str, Callable] = {}
#: name -> factory(model, *, model_name, n, seed, **kw) returning a dataset adapter
DATASETS: dict[str, Callable] = {}


def register_model(name: str):
    def deco(fn):
        MODELS[name] = fn
        return fn

    return deco


def register_dataset(name: str):
    """Register ``factory(model, *, model_name, n, seed, **kw)`` under ``name``; it returns a dataset adapter.

    A dataset adapter is any object with

    * ``name`` (str) and ``__len__``;
    * ``batch(indices) -> dict``: whatever ``score`` needs for those samples (typically the model inputs,
      left-padded, plus the targets);
    * ``score(model, batch) -> list[float]``: runs the model (a forward for first-token scoring, or
      ``generate``) and returns one score in [0, 1] per sample (1.0 = correct);
      A sample's score may instead be a dict: ``"score"`` plus further named numbers (e.g. a KL divergence),
      which the results table shows as extra columns (means over the samples; NaN values are skipped);
    * optionally ``score_name``: what the score measures (the table's column header; default "accuracy");
    * optionally ``prepare(model)``: called once with no method attached, before any scoring (e.g. to
      compute reference answers).

    The runner attaches each method, calls ``batch``/``score`` on its shard of indices, and counts the FLOPs
    and visual tokens of every forward ``score`` runs (``vtok.eval.flops.Tracker``). The easy-VQA harnesses
    (``vtok.eval.harnesses``) score one forward with ``logits_to_keep=1`` by an argmax over the answers'
    first-token ids.
    """

    def deco(fn):
        DATASETS[name] = fn
        return fn

    return deco


def load_registries() -> None:
    """Import the modules that register the built-in real-data entries (the offline VLM, DINOv2 and their
    harnesses), so that ``vtok eval`` finds them by name."""
    from . import docs, harnesses, video_harness  # noqa: F401  (registers offline-vlm, easy-vqa, docs-pages...)


def lookup(kind: str, name: str) -> Callable:
    """The registered factory of a ``kind`` ("model" or "dataset") by name; an unknown name raises a
    ValueError listing the known ones (``vtok eval`` asks before it loads anything)."""
    load_registries()
    table = {"model": MODELS, "dataset": DATASETS}[kind]
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(sorted(table))}")
    return table[name]


def load_model(name: str):
    return lookup("model", name)()


def load_dataset(name: str, model, **kw):
    return lookup("dataset", name)(model, **kw)


def next_token_fidelity(logp: torch.Tensor, logq: torch.Tensor) -> dict:
    """A compressed run against the full model's next-token log-probs ``logp``: ``score`` (top-1 agreement) and
    ``KL`` (KL(full || compressed) in nats, fp32; zero-probability tokens contribute nothing)."""
    p = logp.exp()
    kl = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum().clamp_min(0)
    return {"score": float(int(logp.argmax()) == int(logq.argmax())), "KL": float(kl)}


def first_output(out) -> torch.Tensor:
    """The tensor a model's answer is read from: last-position logits (LMs/VLMs), classifier logits,
    pooled features (vision encoders) -- [B, C]."""
    logits = getattr(out, "logits", None)
    if logits is not None:
        return logits[:, -1] if logits.dim() == 3 else logits
    pooled = getattr(out, "pooler_output", None)
    if pooled is not None:
        return pooled
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, torch.Tensor):
        return out[:, 0] if out.dim() == 3 else out
    raise TypeError(f"cannot read an answer from a model output of type {type(out).__name__}")


class SyntheticDataset:
    """Random prompts for a tiny model of ``vtok.testing.TINY_CASES``; the answer of each sample is
    the unreduced model's top-1 output (its next token for a VLM), so accuracy is agreement with the
    full model: 100% without a method, lower the more a method changes the answer.

    Samples differ in text length and number/size of images, so batches are ragged.
    """

    def __init__(self, case: str = "llava", n: int = 16, seed: int = 0):
        from vtok.testing import TINY_CASES

        if case not in TINY_CASES:
            raise ValueError(f"unknown tiny case {case!r}; known: {', '.join(TINY_CASES)}")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r} must be an int >= 1")
        self.case = TINY_CASES[case]
        self.name = f"synthetic-{case}"
        self.n = n
        self.seed = seed
        self.specs = self._specs(random.Random(seed))
        self.targets: list[int] | None = None
        self._samples = None

    def _specs(self, rng: random.Random) -> list:
        ref = self.case.specs or []
        out = []
        for i in range(self.n):
            if self.case.kind == "vision":
                out.append(i)
            elif ref and isinstance(ref[0][1], list):  # AnyRes: (words, [(H, W), ...], words)
                out.append((rng.randint(1, 8), [(rng.randint(30, 90), rng.randint(30, 90))], rng.randint(1, 6)))
            else:  # (text before, images, text after)
                out.append((rng.randint(1, 8), 1 + (i % 4 == 3), rng.randint(1, 6)))
        return out

    def __len__(self) -> int:
        return self.n

    def _all(self, model):
        if self._samples is None:
            self._samples = self.case.make_samples(model, self.specs, seed=self.seed)
        return self._samples

    def prepare(self, model) -> None:
        """Reference answers: the model's own top-1 output, one sample at a time (no padding effects)."""
        samples = self._all(model)
        targets = []
        with torch.no_grad():
            for s in samples:
                out = model(**self.case.batch([s]))
                targets.append(int(first_output(out).argmax(-1)[0]))
        self.targets = targets

    def batch(self, indices) -> dict:
        if self._samples is None or self.targets is None:
            raise RuntimeError("call prepare(model) first (the runner does)")
        inputs = self.case.batch([self._samples[i] for i in indices])
        return {"inputs": inputs, "targets": [self.targets[i] for i in indices]}

    def score(self, model, batch) -> list:
        inputs = dict(batch["inputs"])
        if self.case.kind != "vision":
            inputs["logits_to_keep"] = 1
        with torch.no_grad():
            pred = first_output(model(**inputs)).argmax(-1).tolist()
        return [float(p == t) for p, t in zip(pred, batch["targets"])]


def _tiny_model_factory(case_name):
    def build():
        from vtok.testing import TINY_CASES

        return TINY_CASES[case_name].build()

    return build


def _register_tiny() -> None:
    from vtok.testing import TINY_CASES

    for case_name in TINY_CASES:
        MODELS.setdefault(f"tiny-{case_name.replace('_', '-')}", _tiny_model_factory(case_name))


@register_dataset("synthetic")
def _synthetic(model, *, model_name: str | None = None, n: int = 16, seed: int = 0, **kw):
    case = (model_name or "tiny-llava").removeprefix("tiny-").replace("-", "_")
    return SyntheticDataset(case, n=n, seed=seed)


_register_tiny()
