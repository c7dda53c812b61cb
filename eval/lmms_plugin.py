"""lmms-eval model plugin: any local HF LLaVA-family checkpoint with a vtok method attached (``VtokLlava``).

Registered through the ``lmms_eval.models`` entry point (``pip install vtok[lmms]``; ``manifests``). Usage and
arguments: the ``VtokLlava`` docstring. lmms-eval is imported only when it asks for the class.
"""

from __future__ import annotations

import json
import os
import time

__all__ = ["MODEL_ID", "manifests", "split_vtok_args", "vtok_config", "describe_config"]

MODEL_ID = "vtok"
CLASS_PATH = "vtok.eval.lmms_plugin.VtokLlava"


def manifests():
    """Entry-point payload for lmms-eval's ``ModelRegistryV2``: one simple (non-chat) model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH, aliases=("vtok_llava_hf",))]


def split_vtok_args(kwargs: dict) -> tuple:
    """Split lmms-eval ``--model_args`` into (method spec for ``vtok.apply``, hyper-parameters, the rest).

    ``vtok_method=fastv,vtok_layer=2`` -> ("fastv", {"layer": 2}); ``vtok_method=pool+fastv,
    vtok_fastv.retain=0.5`` -> (["pool", "fastv"], {"fastv": {"retain": 0.5}}).
    """
    rest, hp = {}, {}
    method = None
    for k, v in kwargs.items():
        if k == "vtok_method":
            method = str(v)
        elif k.startswith("vtok_"):
            hp[k[len("vtok_") :]] = v
        else:
            rest[k] = v
    if method is None:
        if hp:
            raise ValueError(f"vtok hyper-parameters {sorted(hp)} given without vtok_method=NAME")
        return None, {}, rest
    if "+" in method:
        names = [m for m in method.split("+") if m]
        per: dict = {}
        for key, v in hp.items():
            name, dot, field = key.partition(".")
            if not dot or name not in names:
                raise ValueError(
                    f"with several methods ({method}), name the method of each hyper-parameter: vtok_<method>.<name>=value, "
                    f"got vtok_{key}"
                )
            per.setdefault(name, {})[field] = v
        return names, per, rest
    return method, hp, rest


def vtok_config(handle) -> dict:
    """What is attached, for the logs: ``{"methods": [[name, {hyper-parameter: value}], ...]}`` with every
    hyper-parameter as the method resolved it (defaults included); ``{"methods": []}`` for the full model."""
    if handle is None:
        return {"methods": []}
    return {"methods": [[m.name, {k: _plain(v) for k, v in m.config().items()}] for m in handle.methods]}


def _plain(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return repr(v)


def describe_config(cfg: dict) -> str:
    if not cfg["methods"]:
        return "no method (full model)"
    return " + ".join(f"{name}({', '.join(f'{k}={v!r}' for k, v in hp.items())})" for name, hp in cfg["methods"])


def _build_class():
    from lmms_eval.models.simple.llava_hf import LlavaHf
    from loguru import logger as eval_logger

    import vtok

    class VtokLlava(LlavaHf):
        """lmms-eval's ``llava_hf`` model with a vtok method attached to the loaded checkpoint.

        Registered through the ``lmms_eval.models`` entry-point group (``pip install vtok[lmms]``)::

            [project.entry-points."lmms_eval.models"]
            vtok = "vtok.eval.lmms_plugin:manifests"

        then::

            lmms-eval --model vtok --tasks mme --batch_size 1 \\
                --model_args pretrained=/path/to/llava-1.5-7b-hf,vtok_method=fastv,vtok_layer=2,vtok_retain=0.5
            accelerate launch --multi_gpu --num_processes 8 -m lmms_eval --model vtok --model_args ...  # data parallel

        ``pretrained`` may be any ``llava``, ``llava_next`` or ``llava_onevision`` checkpoint (a local folder
        works offline). ``vtok_method`` names the method (several: ``vtok_method=pool+fastv``); every other
        ``vtok_<name>=value`` is a hyper-parameter of it (with several methods: ``vtok_fastv.retain=0.5``).
        The remaining arguments go to lmms-eval's own ``llava_hf`` model (``device``, ``dtype``,
        ``attn_implementation``, ``batch_size``...), whose prompting, generation and log-likelihood code is
        used unchanged: vtok only attaches its hooks to the loaded model. ``image_backend`` (default ``pil``)
        reloads the processor with transformers' PIL image backend, bit-identical to the HF processors the
        checkpoints were released with and to ``vtok eval``'s preprocessing (``auto``: transformers' default).

        What ran is recorded: the method with every hyper-parameter (defaults included) and the mean visual
        tokens before/after per request (from ``handle.stats``) are logged (``vtok: ...`` lines), and the
        numbers land in lmms-eval's results JSON as ``results["throughput"]["avg_vtok_visual_tokens_in"]``,
        ``..._out`` and ``avg_vtok_kept`` (lmms-eval's ``log_metrics``). ``model.vtok_summary()`` returns
        them for the requests seen so far.

        This module imports lmms-eval only when lmms-eval asks for the class (``manifests`` needs just its
        ``ModelManifest``), so the entry point costs nothing at discovery time.
        """

        is_simple = True

        def __init__(self, pretrained: str, image_backend: str = "pil", **kwargs) -> None:
            method, hp, rest = split_vtok_args(kwargs)
            if not rest.get("device_map") and int(os.environ.get("WORLD_SIZE", "1")) == 1:
                # llava_hf's default device_map="" is rejected by transformers >= 5 when one process runs
                rest["device_map"] = str(rest.get("device", "cuda"))
            super().__init__(pretrained=pretrained, **rest)
            if image_backend != "auto":
                self._use_image_backend(pretrained, image_backend, rest)
            self.vtok_handle = vtok.apply(self.model, method, **hp) if method is not None else None
            self._vtok_tokens: list = []
            self._vtok_unreduced = 0
            self.vtok_config = vtok_config(self.vtok_handle)
            eval_logger.info(f"vtok: {describe_config(self.vtok_config)}")

        def _use_image_backend(self, pretrained, backend, rest) -> None:
            """Reload the processor with the PIL image backend (``image_backend=pil``, the default): the
            preprocessing the original (slow) HF processors did and vtok's own evaluation does, bit for bit;
            transformers 5 picks its torchvision backend otherwise, whose resize differs in the last bits."""
            from transformers import AutoProcessor

            try:
                proc = AutoProcessor.from_pretrained(pretrained, backend=backend,
                                                     trust_remote_code=rest.get("trust_remote_code", False))
            except TypeError:  # a transformers without image-processor backends: its default is already PIL
                return
            proc.tokenizer.padding_side = "left"
            self._image_processor, self._tokenizer = proc, proc.tokenizer

        def _run(self, parent, requests):
            res, t0 = [], time.perf_counter()
            h = self.vtok_handle
            for r in requests:  # the parent runs one request per call to generate (batch size 1)
                if h is not None:
                    h.stats = []
                res += parent([r])
                if h is not None:
                    if h.stats:
                        self._vtok_tokens.append((sum(h.stats[0].tokens_in), sum(h.stats[-1].tokens_out)))
                    else:  # the model was not reached (llava_hf logs the error and answers "") or passed through
                        self._vtok_unreduced += 1
            self._log_summary(time.perf_counter() - t0, len(requests))
            return res

        def generate_until(self, requests):
            return self._run(super().generate_until, requests)

        def loglikelihood(self, requests):
            return self._run(super().loglikelihood, requests)

        def _log_summary(self, elapsed: float, n: int) -> None:
            """Log the method and the visual tokens; the numbers also go to lmms-eval's results JSON
            (``results["throughput"]["avg_vtok_*"]``) through its ``log_metrics``."""
            s = self.vtok_summary()
            eval_logger.info(f"vtok: {describe_config(self.vtok_config)}; {json.dumps(s)}")
            if self.vtok_handle is not None and self._vtok_unreduced:
                eval_logger.warning(f"vtok: {self._vtok_unreduced} request(s) ran without a reduction record "
                                    "(an error inside generate, logged above by llava_hf, or a passthrough call)")
            try:
                from lmms_eval.models.model_utils.gen_metrics import log_metrics
            except ImportError:  # pragma: no cover - an lmms-eval without it
                return
            extra = {k: v for k, v in s.items() if isinstance(v, (int, float))}
            log_metrics(total_elapsed_time=elapsed, total_gen_tokens=0, avg_speed=0.0,
                        additional_metrics={f"vtok_{k}": v for k, v in extra.items()})

        def vtok_summary(self) -> dict:
            """Mean visual tokens entering the first reduction and left after the last, over the requests so far,
            and their ratio (``kept``)."""
            n = len(self._vtok_tokens)
            out = {"requests": n}
            if self._vtok_unreduced:
                out["requests_without_reduction"] = self._vtok_unreduced
            if n:
                tin = sum(a for a, _ in self._vtok_tokens) / n
                tout = sum(b for _, b in self._vtok_tokens) / n
                out.update(visual_tokens_in=tin, visual_tokens_out=tout, kept=tout / tin if tin else 1.0)
            return out

    VtokLlava.__module__ = __name__
    VtokLlava.__qualname__ = "VtokLlava"
    return VtokLlava


_CLASS = None


def __getattr__(name):  # PEP 562: the class exists once lmms-eval (and its llava_hf model) can be imported
    global _CLASS
    if name == "VtokLlava":
        if _CLASS is None:
            _CLASS = _build_class()
        return _CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
