"""lmms-eval model plugin: any local HF LLaVA-family checkpoint with a vtok method attached (``VtokLlava``).

Registered through the ``lmms_eval.models`` entry point (``pip install vtok[lmms]``; ``manifests``). Usage and
arguments: the ``VtokLlava`` docstring. lmms-eval is imported only when it asks for the class.
"""

from __future__ import annotations

import os

__all__ = ["MODEL_ID", "manifests", "split_vtok_args"]

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


def _build_class():
    import vtok
    from lmms_eval.models.simple.llava_hf import LlavaHf

    class VtokLlava(LlavaHf):
        """lmms-eval's ``llava_hf`` model with a vtok method attached to the loaded checkpoint.

        Registered through the ``lmms_eval.models`` entry-point group (``pip install vtok[lmms]``)::

            [project.entry-points."lmms_eval.models"]
            vtok = "vtok.eval.lmms_plugin:manifests"

        then::

            lmms-eval --model vtok --tasks mme --batch_size 1 \\
                --model_args pretrained=/path/to/llava-1.5-7b-hf,vtok_method=fastv,vtok_layer=2,vtok_retain=0.5
            accelerate launch --num_processes 8 -m lmms_eval --model vtok --model_args ...   # data parallel

        ``pretrained`` may be any ``llava``, ``llava_next`` or ``llava_onevision`` checkpoint (a local folder
        works offline). ``vtok_method`` names the method (several: ``vtok_method=pool+fastv``); every other
        ``vtok_<name>=value`` is a hyper-parameter of it (with several methods: ``vtok_fastv.retain=0.5``).
        The remaining arguments go to lmms-eval's own ``llava_hf`` model (``device``, ``dtype``,
        ``attn_implementation``, ``batch_size``...), whose prompting, generation and log-likelihood code is
        used unchanged: vtok only attaches its hooks to the loaded model. ``model.vtok_summary()`` reports
        the visual tokens kept over the requests seen so far.

        This module imports lmms-eval only when lmms-eval asks for the class (``manifests`` needs just its
        ``ModelManifest``), so the entry point costs nothing at discovery time.
        """

        is_simple = True

        def __init__(self, pretrained: str, **kwargs) -> None:
            method, hp, rest = split_vtok_args(kwargs)
            if not rest.get("device_map") and int(os.environ.get("WORLD_SIZE", "1")) == 1:
                # llava_hf's default device_map="" is rejected by transformers >= 5 when one process runs
                rest["device_map"] = str(rest.get("device", "cuda"))
            super().__init__(pretrained=pretrained, **rest)
            self.vtok_handle = vtok.apply(self.model, method, **hp) if method is not None else None
            self._vtok_tokens: list = []

        def _note(self):
            h = self.vtok_handle
            if h is not None and h.stats:
                self._vtok_tokens.append((sum(h.stats[0].tokens_in), sum(h.stats[-1].tokens_out)))

        def generate_until(self, requests):
            res = []
            for r in requests:  # the parent runs one request per call to generate (batch size 1)
                res += super().generate_until([r])
                self._note()
            return res

        def loglikelihood(self, requests):
            res = []
            for r in requests:
                res += super().loglikelihood([r])
                self._note()
            return res

        def vtok_summary(self) -> dict:
            """Mean visual tokens entering the first reduction and left after the last, over the requests so far."""
            n = len(self._vtok_tokens)
            if not n:
                return {"requests": 0}
            return {
                "requests": n,
                "visual_tokens_in": sum(a for a, _ in self._vtok_tokens) / n,
                "visual_tokens_out": sum(b for _, b in self._vtok_tokens) / n,
            }

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
