"""The ``AskModel`` probe of VLM adapters: the attached model's own language model asked about visual items
(QuoTA's frame scorer), and text-only greedy answers, run untouched inside the call."""

from __future__ import annotations

import torch

from vtok.hf_compat import cache_kwarg, output_cache

__all__ = ["ModelAsk"]

#: where the visual tokens go in the rendered chat template (split out before tokenizing)
MARK = "<vtok-visual>"


class ModelAsk:
    """``AskModel``'s result for one prefill (see ``vtok.probes.AskModel``): built by the adapter, which
    gives its language model (``adapter.lm``), output head and ``nested()`` context."""

    def __init__(self, adapter, processor, chunk: int = 16):
        self.adapter, self.chunk = adapter, chunk
        self.processor = processor
        self.tok = getattr(processor, "tokenizer", processor)
        self.template = getattr(self.tok, "chat_template", None) or getattr(processor, "chat_template", None)
        self.forwards: list[tuple[int, int, int, int]] = []
        self._pieces: dict = {}

    # prompts ---------------------------------------------------------------------------------
    def ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def answer_id(self, answer: str) -> int:
        """The first token of ``answer`` as the tokenizer writes it on its own."""
        ids = self.ids(answer) if isinstance(answer, str) else []
        if not ids:
            raise ValueError(f"AskModel: answer={answer!r} has no tokens; give the word whose probability is wanted")
        return ids[0]

    def _chat(self, content) -> str:
        msgs = [{"role": "user", "content": content}]
        return self.tok.apply_chat_template(msgs, chat_template=self.template, tokenize=False, add_generation_prompt=True)

    def _rendered(self, prompt: str, visual: bool) -> str:
        """The chat template around ``prompt``, ``MARK`` where the visual tokens go: string content first, then
        processor-style list content (an image entry, rendered as the processor's image token)."""
        try:
            text = self._chat(f"{MARK}\n{prompt}" if visual else prompt)
        except Exception:  # noqa: BLE001 - a template that takes only list content; tried below
            text = ""
        if prompt.strip() in text and (not visual or text.count(MARK) == 1):
            return text
        image = getattr(self.processor, "image_token", None) or "<image>"
        text = self._chat([{"type": "image"}] * visual + [{"type": "text", "text": prompt}])
        if prompt.strip() not in text or (visual and text.count(image) != 1):
            raise ValueError(
                f"AskModel: the chat template of {type(self.processor).__name__} renders neither a string user turn nor "
                f"a list of an image (as {image!r}) and a text entry; pass a tokenizer with a plain chat template, or none"
            )
        return text.replace(image, MARK) if visual else text

    def pieces(self, prompt: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the visual tokens of an item asked with ``prompt``."""
        if prompt not in self._pieces:
            if self.template:
                before, after = self._rendered(prompt, True).split(MARK)
                self._pieces[prompt] = (self.ids(before), self.ids(after))
            else:
                bos = self.tok.bos_token_id
                self._pieces[prompt] = ([bos] if bos is not None else [], self.ids(" " + prompt))
        return self._pieces[prompt]

    def text_ids(self, prompt: str) -> list[int]:
        """A text-only prompt's ids (chat template, else BOS and the text)."""
        if self.template:
            return self.ids(self._rendered(prompt, False))
        bos = self.tok.bos_token_id
        return ([bos] if bos is not None else []) + self.ids(prompt)

    # forwards --------------------------------------------------------------------------------
    def _batch(self, seqs: list[list]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded embeddings of items given as pieces (id lists and [k, D] tensors), mask, positions."""
        emb = self.adapter.lm.get_input_embeddings()
        dev, dt = emb.weight.device, emb.weight.dtype
        rows = []
        for pieces in seqs:
            parts = [emb(torch.tensor(p, dtype=torch.long, device=dev)) if isinstance(p, list) else p.to(dev, dt) for p in pieces]
            rows.append(torch.cat(parts))
        n = max(r.shape[0] for r in rows)
        x = torch.zeros(len(rows), n, rows[0].shape[-1], dtype=dt, device=dev)
        mask = torch.zeros(len(rows), n, dtype=torch.long, device=dev)
        for i, r in enumerate(rows):
            x[i, n - r.shape[0] :] = r
            mask[i, n - r.shape[0] :] = 1
        return x, mask, (mask.cumsum(1) - 1).clamp_min(0)

    def _last_logits(self, out) -> torch.Tensor:
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.adapter.model.get_output_embeddings()(h[:, -1]).float()

    def __call__(self, visual, prompts, answer: str = "Yes") -> torch.Tensor:
        if len(visual) != len(prompts):
            raise ValueError(f"AskModel: {len(visual)} visual items but {len(prompts)} prompts; give one prompt per item")
        tok = self.answer_id(answer)
        items = [(self.pieces(p)[0], v, self.pieces(p)[1]) for v, p in zip(visual, prompts)]
        out = []
        with self.adapter.nested(), torch.no_grad():
            for i in range(0, len(items), self.chunk):
                x, mask, pos = self._batch(items[i : i + self.chunk])
                res = self.adapter.lm(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False)
                self.forwards.append((x.shape[0], x.shape[1], x.shape[1], 1))
                out.append(torch.softmax(self._last_logits(res), -1)[:, tok])
        return torch.cat(out) if out else torch.zeros(0)

    def generate(self, prompts, max_new_tokens: int = 64) -> list[str]:
        """Greedy text-only answers to ``prompts`` (stopping at the tokenizer's EOS), special tokens skipped."""
        seqs = [[self.text_ids(p)] for p in prompts]
        out: list = []
        with self.adapter.nested(), torch.no_grad():
            for i in range(0, len(seqs), self.chunk):
                out += self._greedy(seqs[i : i + self.chunk], max_new_tokens)
        return [self.tok.decode(o, skip_special_tokens=True) for o in out]

    def _greedy(self, seqs, steps: int) -> list[list[int]]:
        x, mask, pos = self._batch(seqs)
        lm, emb, eos = self.adapter.lm, self.adapter.lm.get_input_embeddings(), self.tok.eos_token_id
        res = lm(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=True)
        key = cache_kwarg(lm)  # past_key_values before transformers 5.24, cache from it on
        self.forwards.append((x.shape[0], x.shape[1], x.shape[1], 1))
        new, done = [], torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for step in range(steps):
            nxt = self._last_logits(res).argmax(-1)
            new.append(torch.where(done, -1, nxt))
            done |= nxt == eos if eos is not None else done
            if bool(done.all()) or step == steps - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos[:, -1:] + 1
            res = lm(inputs_embeds=emb(nxt[:, None]), attention_mask=mask, position_ids=pos, use_cache=True,
                     **{key: output_cache(res)})  # fmt: skip
            self.forwards.append((x.shape[0], 1, mask.shape[1], 1))
        rows = torch.stack(new, 1).tolist() if new else [[] for _ in seqs]
        return [[t for t in r if t >= 0 and t != eos] for r in rows]
