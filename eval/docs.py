"""Document pages for ``vtok eval --dataset docs-pages``: real PDF pages the harness writes itself (fpdf2) and renders
(pypdfium2), scored by FIDELITY to the uncompressed model (``DocFidelity``: the offline demo VLM cannot read text).

Install: ``pip install vtok[docs]`` (fpdf2, pypdfium2).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from vtok.method import Method

from .datasets import next_token_fidelity, register_dataset, register_model

__all__ = ["render_page", "Page", "DocFidelity", "KeepAll", "ink_grid"]

WORDS = (
    "system data model value report table section method result number figure page index token image crop "
    "budget layer vector window format record field entry header footer column signal sample output input "
    "measure process error limit range scale level annual budget invoice account balance total revenue cost "
    "quarter region office market product service client order payment contract policy review summary note"
).split()
DPI = 96  # an A4 page renders to 794 x 1123 px: a 3 x 2 AnyRes grid of 224 px crops on the NeXT demo model


@dataclass
class Page:
    """A rendered page and its known content."""

    image: object  # PIL RGB
    title: str
    paragraphs: list
    table: list  # (item, value)
    questions: list  # (question, answer)


def _sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def render_page(seed: int, dpi: int = DPI) -> Page:
    """Write one A4 page with fpdf2 (content from ``seed``; upper part text, lower part blank paper but for a
    footer) and render it with pypdfium2 at ``dpi``.

    The content is known (a title, paragraphs, a small table, a footer) and drawn from a seeded word list; the
    wide margins and the blank lower part make an AnyRes model see crops full of text beside crops of white
    paper."""
    try:
        import pypdfium2 as pdfium
        from fpdf import FPDF
    except ImportError as e:  # pragma: no cover
        raise ImportError("the document harness needs fpdf2 and pypdfium2: pip install 'vtok[docs]'") from e
    rng = random.Random(seed)
    title = f"{rng.choice(WORDS).capitalize()} {rng.choice(WORDS)} report {rng.randint(100, 999)}"
    paragraphs = [" ".join(_sentence(rng, rng.randint(6, 12)) for _ in range(rng.randint(2, 4))) for _ in range(rng.randint(2, 3))]
    items = rng.sample(WORDS, 3)
    table = [(w, str(rng.randint(10, 9999))) for w in items]
    pdf = FPDF(format="A4", unit="mm")
    pdf.set_auto_page_break(False)
    pdf.set_margins(left=30, top=30, right=30)
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 18)
    pdf.multi_cell(0, 10, title)
    pdf.ln(4)
    pdf.set_font("Helvetica", "", 11)
    for p in paragraphs:
        pdf.multi_cell(0, 6, p)
        pdf.ln(3)
    pdf.set_font("Helvetica", "B", 11)
    pdf.cell(50, 7, "item", border=1)
    pdf.cell(30, 7, "value", border=1, new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "", 11)
    for w, v in table:
        pdf.cell(50, 7, w, border=1)
        pdf.cell(30, 7, v, border=1, new_x="LMARGIN", new_y="NEXT")
    pdf.set_y(-20)
    pdf.set_font("Helvetica", "I", 9)
    pdf.cell(0, 6, f"page {seed + 1}", align="C")
    doc = pdfium.PdfDocument(bytes(pdf.output()))
    image = doc[0].render(scale=dpi / 72).to_pil().convert("RGB")
    doc.close()
    first = paragraphs[1].split()[0].rstrip(".").lower() if len(paragraphs) > 1 else ""
    questions = [
        ("What is the title of the document?", title),
        (f"What is the value of {table[0][0]} in the table?", table[0][1]),
        ("What is the first word of the second paragraph?", first),
    ]
    return Page(image, title, paragraphs, table, questions)


def ink_grid(image, rows: int, cols: int, threshold: int = 160) -> np.ndarray:
    """[rows, cols] bool: whether the part of ``image`` under each cell of a rows x cols grid holds any dark pixel."""
    gray = np.asarray(image.convert("L"))
    h, w = gray.shape
    dark = gray < threshold
    ys = np.linspace(0, h, rows + 1).round().astype(int)
    xs = np.linspace(0, w, cols + 1).round().astype(int)
    return np.array([[dark[ys[r] : ys[r + 1], xs[c] : xs[c + 1]].any() for c in range(cols)] for r in range(rows)])


@dataclass
class KeepAll(Method):
    """Keeps every token and records the units' crop/grid bookkeeping (the no-op invariant makes the model's
    output the untouched model's). Not registered: the harness attaches an instance."""

    name = "keep-all-recorder"
    stages = ("before_llm",)

    position_policy: str = "compact"  # after a reducing method in a chain, the chain's last sets the policy

    def before_llm(self, tokens, probes):
        self.tokens = tokens
        return tokens


KEEP_RECORDER = KeepAll


class DocFidelity:
    """Questions about rendered pages on an AnyRes VLM, scored against the full model.

    The offline demo VLM cannot read text, so answers are not scored: per question ``prepare`` keeps the full
    model's next-token distribution and ``score`` compares a compressed run with it (top-1 agreement, KL) and
    says where the kept tokens lie (blank crops vs. crops with ink).

    ``score`` returns per question a dict: ``score`` (top-1 agreement with the full model), ``KL`` (nats,
    KL(full || compressed) of the next-token distribution), ``kept in blank crops`` (share of the visual
    tokens the method kept that lie in crops without ink: the base image or an AnyRes crop whose part of the
    page is white) and ``ink kept`` (share of the tokens over ink that survive, as themselves or as merge
    destinations). The last two need the method's kept indices (``Reduction.kept`` of one before_llm
    stage); elsewhere they are NaN (e.g. ``pool``, whose tokens are new). ``crop shares``: also per question,
    the kept share of each crop is in ``self.crop_shares`` after scoring.
    """

    score_name = "top-1 agree"

    def __init__(self, processor, n: int = 6, seed: int = 0, questions_per_page: int = 2, dpi: int = DPI):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r} must be an int >= 1")
        if not 1 <= questions_per_page <= 3:
            raise ValueError(f"questions_per_page={questions_per_page!r} must be 1, 2 or 3")
        self.name = "docs-pages"
        self.processor = processor
        self.n = n
        self.seed = seed
        self.qpp = questions_per_page
        self.dpi = dpi
        self._pages: dict = {}
        self.reference: list | None = None
        self.layout: list | None = None  # per question: (crop [n], ink [n], blank crop ids)
        self.crop_shares: dict = {}

    def __len__(self) -> int:
        return self.n

    def page(self, p: int) -> Page:
        if p not in self._pages:
            self._pages[p] = render_page(self.seed * 10_007 + p, self.dpi)
        return self._pages[p]

    def item(self, i: int):
        page = self.page(i // self.qpp)
        return page, page.questions[i % self.qpp][0]

    def inputs(self, indices) -> dict:
        pages, prompts = [], []
        for i in indices:
            page, q = self.item(i)
            pages.append(page.image)
            prompts.append(f"<image>Question: {q} Answer:")
        self.processor.tokenizer.padding_side = "left"
        out = dict(self.processor(images=pages, text=prompts, padding=True, return_tensors="pt"))
        mask = out["attention_mask"]
        out["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        return out

    def _token_ink(self, tokens, page) -> tuple:
        """Per visual token of the (single) unit: its crop and whether its part of the page holds ink."""
        n = int(tokens.counts()[0])
        ex = {k: v[0, :n].cpu() for k, v in tokens.extra.items()}
        grids = tokens.unit_grids()[0]
        ink = torch.zeros(n, dtype=torch.bool)
        for blk, (h, w) in enumerate(grids):
            sel = ex["block"] == blk
            g = torch.from_numpy(ink_grid(page.image, h, w))
            ink[sel] = g[ex["row"][sel], ex["col"][sel]]
        crop = ex["crop"]
        blank = [int(c) for c in torch.unique(crop) if not bool(ink[crop == c].any())]
        return crop, ink, blank

    @torch.no_grad()
    def prepare(self, model) -> None:
        """The full model's next-token log-probabilities and each question's crop/ink layout, one question at a
        time (no padding)."""
        import vtok

        dev = next(model.parameters()).device
        ref, layout = [], []
        for i in range(self.n):
            rec = KEEP_RECORDER()
            inputs = {k: v.to(dev) for k, v in self.inputs([i]).items()}
            with vtok.apply(model, rec):
                out = model(**inputs, logits_to_keep=1, use_cache=False)
            ref.append(torch.log_softmax(out.logits[0, -1].float(), -1).cpu())
            layout.append(self._token_ink(rec.tokens, self.item(i)[0]))
        self.reference, self.layout = ref, layout

    def batch(self, indices) -> dict:
        if self.reference is None:
            raise RuntimeError("call prepare(model) first (the runner does)")
        return {"inputs": self.inputs(indices), "indices": list(indices)}

    @torch.no_grad()
    def score(self, model, batch) -> list:
        dev = next(model.parameters()).device
        inputs = {k: v.to(dev) for k, v in batch["inputs"].items()}
        out = model(**inputs, logits_to_keep=1, use_cache=False)
        logq = torch.log_softmax(out.logits[:, -1].float(), -1).cpu()
        kept = self._kept(model, len(batch["indices"]))
        res = []
        for b, i in enumerate(batch["indices"]):
            logp = self.reference[i]
            row = next_token_fidelity(logp, logq[b])
            crop, ink, blank = self.layout[i]
            k = kept[b] if kept is not None else None
            if k is None:
                k = torch.arange(crop.numel()) if not self._reduced(model) else None
            if k is None:
                row.update({"kept in blank crops": math.nan, "ink kept": math.nan})
            else:
                kc = crop[k]
                row["kept in blank crops"] = float(torch.isin(kc, torch.tensor(blank, dtype=kc.dtype)).float().mean()) if k.numel() else 0.0
                row["ink kept"] = float(ink[k].sum()) / max(1, int(ink.sum()))
                self.crop_shares[i] = {int(c): float((kc == c).sum()) / float((crop == c).sum()) for c in torch.unique(crop)}
            res.append(row)
        return res

    @staticmethod
    def _reduced(model) -> bool:
        handle = getattr(model, "_vtok_handle", None)
        return handle is not None and bool(handle.stats)

    @staticmethod
    def _kept(model, batch: int):
        """Per sample, the kept visual-token indices of the attached method's single before_llm stage, or None."""
        handle = getattr(model, "_vtok_handle", None)
        if handle is None:
            return None
        events = [e for e in handle.stats if e.stage == "before_llm"]
        if len(events) != 1 or len(handle.stats) != 1 or events[0].kept is None:
            return [None] * batch if handle.stats else None
        return [k.cpu() for k in events[0].kept]


# ------------------------------------------------------------------------------------------ names for `vtok eval`


@register_model("offline-vlm-next")
def _offline_vlm_next():
    from .offline_next import load_vlm_next

    return load_vlm_next()[0]


def _processor_for(model):
    from transformers import AutoTokenizer

    from . import offline
    from .offline_next import next_processor

    tok = AutoTokenizer.from_pretrained(offline.build_cache() / offline.LM_DIR)
    return next_processor(tok, model)


@register_dataset("docs-pages")
def _docs_pages(model, *, n: int = 6, seed: int = 0, **kw):
    return DocFidelity(_processor_for(model), n=n, seed=seed)
