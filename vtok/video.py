"""Video input: frames of a clip and their timestamps, sampled uniformly or at a frame rate (decord).

``frames, times = vtok.video.load("clip.mp4", num_frames=16)``: uint8 ``(T, H, W, 3)`` RGB, seconds.
Output, timestamps and errors: ``load``'s docstring; the sampling rules: ``sample_indices``'.
"""

from __future__ import annotations

import math
import os
import struct
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["load", "probe", "read_indices", "sample_indices", "Frames", "VideoInfo"]

SAMPLINGS = ("uniform", "fps")


class Frames(NamedTuple):
    """What ``load`` returns: ``frames, times = video.load(path)``."""

    frames: np.ndarray  # uint8, (T, H, W, 3), RGB
    timestamps: np.ndarray  # float64, (T,), seconds


class VideoInfo(NamedTuple):
    """What ``probe`` returns (nothing is decoded)."""

    path: Path
    num_frames: int
    fps: float  # decord's average frame rate
    starts: np.ndarray  # float64 (num_frames,): each frame's start time in seconds
    duration: float  # end of the last frame, seconds
    timestamps_from: str  # "decord" or "index/fps" (decord's were invalid)


# ------------------------------------------------------------------ decord


def _decord():
    try:
        import decord
    except ImportError as e:
        raise ImportError(
            "vtok.video needs decord: pip install 'decord>=0.6' (vtok's own dependencies include it on x86_64; "
            "decord publishes no wheels for other CPUs, where it must be built from source)"
        ) from e
    return decord


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


# ------------------------------------------------------------------ container checks (before decord)

_ISO_FIRST_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"styp"}


def _iso_boxes(f, start: int, end: int):
    """(type, offset, size, header_size) of the boxes in [start, end); size is None when a header is cut off."""
    pos = start
    while pos < end:
        f.seek(pos)
        head = f.read(8)
        if len(head) < 8:
            yield None, pos, None, 8
            return
        size, typ = struct.unpack(">I4s", head)
        hdr = 8
        if size == 1:
            ext = f.read(8)
            if len(ext) < 8:
                yield typ, pos, None, 16
                return
            size, hdr = struct.unpack(">Q", ext)[0], 16
        elif size == 0:
            size = end - pos
        if size < hdr:
            yield typ, pos, -1, hdr
            return
        yield typ, pos, size, hdr
        pos += size


def _iso_video_samples(moov: bytes) -> list[int]:
    """Sample counts of the video tracks ('vide' handler) in a moov box's payload."""

    def children(buf, start, end):
        pos = start
        while pos + 8 <= end:
            size, typ = struct.unpack(">I4s", buf[pos : pos + 8])
            hdr = 8
            if size == 1 and pos + 16 <= end:
                size, hdr = struct.unpack(">Q", buf[pos + 8 : pos + 16])[0], 16
            elif size == 0:
                size = end - pos
            if size < hdr or pos + size > end:
                return
            yield typ, pos + hdr, pos + size
            pos += size

    def find(buf, start, end, path):
        for typ, s, e in children(buf, start, end):
            if typ == path[0]:
                if len(path) == 1:
                    yield s, e
                else:
                    yield from find(buf, s, e, path[1:])

    counts = []
    for ts, te in find(moov, 0, len(moov), (b"trak",)):
        handlers = [moov[s + 8 : s + 12] for s, e in find(moov, ts, te, (b"mdia", b"hdlr")) if e - s >= 12]
        if b"vide" not in handlers:
            continue
        n = None
        for s, e in find(moov, ts, te, (b"mdia", b"minf", b"stbl", b"stsz")):
            if e - s >= 12:
                n = struct.unpack(">I", moov[s + 8 : s + 12])[0]
        for s, e in find(moov, ts, te, (b"mdia", b"minf", b"stbl", b"stz2")):
            if e - s >= 12:
                n = struct.unpack(">I", moov[s + 8 : s + 12])[0]
        if n is not None:
            counts.append(n)
    return counts


def _container_problem(path: Path, size: int) -> str | None:
    """What is structurally wrong with an MP4/MOV or AVI file (None: nothing found, or another format).

    Reads only box/chunk headers (and the MP4 index), so it is cheap; it finds what decord does not report:
    a file cut short (decord may open one whose index comes first and return fewer frames) and an MP4 whose
    video track holds no frames.
    """
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"AVI ":
            riff = struct.unpack("<I", head[4:8])[0]
            if 8 + riff > size:
                return f"is truncated: its AVI header announces {8 + riff} bytes, the file has {size}"
            return None
        if len(head) < 8 or head[4:8] not in _ISO_FIRST_BOXES:
            return None
        moov, fragmented = None, False
        for typ, pos, bsize, hdr in _iso_boxes(f, 0, size):
            name = typ.decode("latin-1") if typ else "?"
            if bsize is None:
                return f"is truncated: the header of box '{name}' at byte {pos} is cut off at byte {size}"
            if bsize < 0:
                return f"is damaged: box '{name}' at byte {pos} has an impossible size"
            if pos + bsize > size:
                return (
                    f"is truncated: box '{name}' at byte {pos} needs {bsize} bytes, the file ends after {size - pos}"
                )
            if typ == b"moov":
                f.seek(pos + hdr)
                moov = f.read(bsize - hdr)
            fragmented |= typ in (b"moof", b"sidx", b"styp")
        if moov is None and not fragmented:
            return "is truncated or unfinished: it has no 'moov' box (the MP4 index)"
        if moov is not None and not fragmented:
            counts = _iso_video_samples(moov)
            if not counts:
                return "has no video track"
            if max(counts) == 0:
                return "has zero video frames (its video track holds no samples)"
    return None


# ------------------------------------------------------------------ open / probe


def _check_path(path) -> Path:
    path = Path(os.fspath(path))
    if not path.exists():
        raise FileNotFoundError(f"video file not found: {path}")
    if path.is_dir():
        raise ValueError(f"video path {path} is a directory, not a file")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"video file {path} is empty (0 bytes)")
    problem = _container_problem(path, size)
    if problem:
        raise ValueError(f"video file {path} {problem}")
    return path


def _open(path: Path):
    decord = _decord()
    try:
        vr = decord.VideoReader(str(path), ctx=decord.cpu(0))
    except AssertionError as e:  # decord 0.6 asserts a positive frame count after opening
        raise ValueError(f"video file {path} has zero video frames ({_first_line(e)})") from None
    except Exception as e:  # decord raises RuntimeError / DECORDError with little detail
        raise ValueError(
            f"video file {path} cannot be opened by decord: not a video, or a damaged file or a container/codec "
            f"its FFmpeg does not read ({_first_line(e)})"
        ) from None
    if len(vr) == 0:
        raise ValueError(f"video file {path} has zero video frames")
    return vr


def _info(path: Path, vr) -> VideoInfo:
    n = len(vr)
    fps = float(vr.get_avg_fps())
    try:
        ts = np.asarray(vr.get_frame_timestamp(np.arange(n)), dtype=np.float64).reshape(n, 2)
    except Exception:  # pragma: no cover - decord gives timestamps for every file it opens
        ts = np.full((n, 2), np.nan)
    starts = ts[:, 0]
    valid = (
        np.isfinite(ts).all()
        and starts[0] > -1.0
        and (np.diff(starts) > 0).all()
        and ts[-1, 1] >= starts[-1]
    )
    if valid:
        source, duration = "decord", float(ts[-1, 1])
    else:
        if not (fps > 0 and math.isfinite(fps)):
            raise ValueError(f"video file {path} has neither valid frame timestamps nor a frame rate")
        source = "index/fps"
        starts = np.arange(n, dtype=np.float64) / fps
        duration = n / fps
    return VideoInfo(path, n, fps, starts, duration, source)


def probe(path) -> VideoInfo:
    """Frame count, frame rate, per-frame start times and duration of a clip, without decoding frames."""
    path = _check_path(path)
    return _info(path, _open(path))


# ------------------------------------------------------------------ sampling


def _check_args(num_frames, sampling, fps, where: str) -> None:
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)):
        raise TypeError(f"{where}: num_frames must be an int >= 1, got {num_frames!r}")
    if num_frames < 1:
        raise ValueError(f"{where}: num_frames must be >= 1, got {num_frames}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"{where}: unknown sampling {sampling!r}; choose one of {', '.join(map(repr, SAMPLINGS))}")
    if sampling == "fps":
        if isinstance(fps, bool) or not isinstance(fps, (int, float, np.integer, np.floating)):
            raise TypeError(f"{where}: fps must be a number > 0, got {fps!r}")
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"{where}: fps must be > 0 and finite, got {fps}")


def _uniform(n: int, k: int) -> np.ndarray:
    """Centres of k equal segments of range(n); all of range(n) when n <= k."""
    if n <= k:
        return np.arange(n)
    return (2 * np.arange(k) + 1) * n // (2 * k)


# float32 timestamps from decord are off by ~1e-6 s; far below any frame interval
_EPS = 1e-4


def sample_indices(starts, duration: float, num_frames: int = 32, sampling: str = "uniform", fps: float = 1.0) -> np.ndarray:
    """Indices of the frames ``load`` returns, given every frame's start time and the clip's end.

    ``starts`` must be strictly increasing. Frames are indexed in presentation order; N frames in the clip,
    K = ``num_frames``:

    * ``"uniform"``: the frame at the centre of each of K equal segments of the frame sequence,
      index ``floor((2k + 1) * N / (2K))`` for ``k = 0..K-1``. On a constant-frame-rate clip these are evenly
      spaced in time and the first and last are half a segment from the ends.
    * ``"fps"``: target times ``t0 + j / fps`` (``t0`` the first frame's time, ``j = 0, 1, ...`` while the target
      lies before the end of the last frame); for each target the frame on screen at that time (the last one that
      starts at or before it). A frame is never returned twice, so asking for more than the clip's frame rate
      returns each frame once. If more than K targets remain, K of them are kept, spread over the whole clip by
      the ``"uniform"`` rule applied to the candidate list (the spacing then grows beyond ``1 / fps``; this is what
      LLaVA-Video- and Qwen2-VL-style pipelines do with a frame cap).
    * A clip with fewer frames than asked for returns the frames it has, each once, in order: never duplicates and
      never padding. ``len(frames)`` can therefore be smaller than ``num_frames``.
    """
    _check_args(num_frames, sampling, fps, "sample_indices")
    starts = np.asarray(starts, dtype=np.float64)
    n = len(starts)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if sampling == "uniform":
        return _uniform(n, num_frames).astype(np.int64)
    t0 = starts[0]
    count = max(1, math.ceil((duration - t0) * fps - _EPS))  # targets t0 + j/fps < duration
    targets = t0 + np.arange(count) / fps
    cand = np.unique(np.clip(np.searchsorted(starts, targets + _EPS, side="right") - 1, 0, n - 1))
    return cand[_uniform(len(cand), num_frames)].astype(np.int64)


# ------------------------------------------------------------------ load


def _decode(path: Path, vr, indices: np.ndarray, sequential: bool) -> np.ndarray:
    try:
        if not sequential:
            frames = vr.get_batch(indices.tolist()).asnumpy()
        else:  # decord's seeking is wrong on this file: read from the start, keep the wanted frames
            want, out = set(indices.tolist()), []
            for k in range(int(indices[-1]) + 1):
                frame = vr.next()
                if k in want:
                    out.append(frame.asnumpy())
            frames = np.stack(out)
    except Exception as e:  # DECORDError, RuntimeError, StopIteration
        raise ValueError(
            f"video file {path}: frames could not be decoded (truncated or corrupt data?): {_first_line(e)}"
        ) from None
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[-1] != 3:
        raise ValueError(f"video file {path}: decord returned frames of shape {frames.shape}, dtype {frames.dtype}")
    return np.ascontiguousarray(frames)


def load(path, num_frames: int = 32, sampling: str = "uniform", fps: float = 1.0) -> Frames:
    """Frames of a video file and their timestamps: ``frames, times = load(path)``.

        from vtok import video
        frames, times = video.load("clip.mp4", num_frames=16)   # uint8 numpy (T, H, W, 3) RGB; seconds
        frames, times = video.load("clip.mp4", sampling="fps", fps=1.0, num_frames=64)

    ``frames`` is a C-contiguous ``numpy.uint8`` array of shape ``(T, H, W, 3)`` in RGB order
    (``torch.from_numpy(frames)`` shares its memory); ``times`` is a ``float64`` array of the ``T`` frames'
    presentation times in seconds, increasing, as decord reads them from the container (the start of each
    frame). ``T <= num_frames``; fewer when the clip (or, with ``sampling="fps"``, its duration times ``fps``)
    has fewer frames: frames are never repeated. The sampling rules: :func:`sample_indices`.

    Timestamps: decord's per-frame timestamps are used where they are valid (finite and strictly increasing).
    Some AVI files carry no timestamps for part of their frames (OpenCV's ``Megamind.avi``: decord reports
    -3.8e17 s for 182 of its 270 frames) and decord then also seeks to wrong frames; for such files ``load``
    warns, uses ``index / average fps`` as the timestamps and decodes sequentially from the first frame, which
    returns the right frames. Variable frame rate is kept: OpenCV's ``tree.avi`` has 68 frames over 29.6 s
    (15 fps nominal), and its timestamps say so where ``index / fps`` would say 4.5 s.

    Errors name the file and what is wrong: a missing path raises ``FileNotFoundError``; an empty file, a file
    decord cannot open (not a video), a truncated MP4/MOV or AVI, a clip without video frames, frames that fail
    to decode, and bad argument values raise ``ValueError`` (arguments of the wrong type: ``TypeError``).
    Truncation is found from the container's own sizes (MP4/MOV boxes, the AVI RIFF header), because decord
    opens an MP4 whose index comes first even when its data is cut short and reports only the frames that
    survived.

    decord is needed only here: it is a dependency of vtok on x86_64 (decord publishes no wheels for other
    CPUs); without it ``load`` raises ``ImportError`` saying how to install it. Frames are decoded on the CPU.
    """
    _check_args(num_frames, sampling, fps, f"video.load({os.fspath(path)!r})")
    path = _check_path(path)
    vr = _open(path)
    info = _info(path, vr)
    if info.timestamps_from != "decord":
        warnings.warn(
            f"video file {path}: decord's frame timestamps are invalid (missing or not increasing); using "
            f"index / {info.fps:g} fps as timestamps and decoding sequentially (decord's seeking is unreliable here)",
            stacklevel=2,
        )
    idx = sample_indices(info.starts, info.duration, num_frames, sampling, fps)
    frames = _decode(path, vr, idx, sequential=info.timestamps_from != "decord")
    return Frames(frames, info.starts[idx].copy())


def read_indices(path, indices) -> np.ndarray:
    """Frames at given indices (``numpy.uint8`` ``(len(indices), H, W, 3)``), with ``load``'s checks and errors."""
    path = _check_path(path)
    vr = _open(path)
    indices = np.asarray(indices, dtype=np.int64)
    n = len(vr)
    if indices.ndim != 1 or len(indices) == 0 or indices.min() < 0 or indices.max() >= n:
        raise ValueError(f"video file {path}: frame indices must be a non-empty list within 0..{n - 1}")
    info = _info(path, vr)
    if info.timestamps_from != "decord":
        order = np.argsort(indices, kind="stable")
        uniq, inverse = np.unique(indices[order], return_inverse=True)
        frames = _decode(path, vr, uniq, sequential=True)[inverse]
        out = np.empty_like(frames)
        out[order] = frames
        return out
    return _decode(path, vr, indices, sequential=False)
