"""Tuning policy of the bipartite match and merge kernels, kept in one place.

Block sizes per device, the match kernel's autotune configs, timing functions and cache of choices,
the B-split rule, and the length above which torch sorts replace the counting kernels. These set
speed; what the kernels compute is in ``match.py`` and ``merge.py``.
"""

from __future__ import annotations

from ._common import next_pow2, num_sms as _num_sms, triton


# --------------------------------------------------------------------------------------------
# block sizes
# --------------------------------------------------------------------------------------------


def _prologue_blocks(device, C: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of the prologue kernel (inverse norms, key reset); small blocks for the interpreter."""
    return (32, min(256, next_pow2(C))) if device.type == "cuda" else (16, min(32, next_pow2(C)))


def _untuned_match_blocks(C: int) -> tuple[int, int, int]:
    """(BLOCK_A, BLOCK_B, BLOCK_C) of the match kernel launched without the autotuner: small tiles,
    for the interpreter's speed."""
    return 16, 16, min(32, max(16, next_pow2(C)))


def _pair_blocks(device) -> tuple[int, int]:
    """(BLOCK_I, BLOCK_J) of the counting kernels (rank, merge prep)."""
    return (32, 256) if device.type == "cuda" else (16, 16)


#: sources per token gathered in one load by the merge kernel (more go through a loop)
_MERGE_MAXC = 4


def _merge_blocks(device, C: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, num_warps) of the merge kernel; small blocks for the interpreter."""
    if device.type == "cuda":
        return 16, min(128, next_pow2(C)), 4
    return 8, min(32, next_pow2(C)), 4


# --------------------------------------------------------------------------------------------
# the match kernel: autotuner configs, timing, cached choices, B splits
# --------------------------------------------------------------------------------------------


_MATCH_CONFIGS = [
    # (BLOCK_A, BLOCK_B, BLOCK_C, num_warps, num_stages). The first four were the fastest of a
    # 48-config sweep on an H100 at (1, 25088, 1152), (1, 6272, 3584) and (32, 577, 1024); the last
    # is for small N. Configs that do not fit in shared memory are skipped by the autotuner.
    (128, 256, 64, 8, 3),
    (128, 128, 128, 8, 3),
    (128, 128, 64, 8, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
]
_EVEN_C = 128  # every BLOCK_C above divides it


def _autotuned(fn, do_bench=None):
    """``fn`` (the match kernel, or its interpreted twin) under Triton's autotuner over ``_MATCH_CONFIGS``."""
    cfgs = [
        triton.Config({"BLOCK_A": a, "BLOCK_B": b, "BLOCK_C": c}, num_warps=w, num_stages=s)
        for a, b, c, w, s in _MATCH_CONFIGS
    ]
    # Every timed config starts from the prologue's keys: atomic_max would otherwise leave the
    # maximum over all timed configs, whose scores can differ in the last bit (different
    # summation orders), and the first call of a shape would disagree with the later ones.
    import inspect

    # ``do_bench`` is newer than Triton 3.0; without it Triton's default timing is used
    takes_bench = "do_bench" in inspect.signature(triton.autotune).parameters
    extra = {"do_bench": do_bench} if do_bench is not None and takes_bench else {}
    return triton.autotune(configs=cfgs, key=["NA", "NB", "C", "SPLIT", "MASKED"],
                           restore_value=["key_ptr"], **extra)(fn)


def _wall_clock_bench(kernel_call, quantiles):
    """``do_bench`` for the autotuner under the interpreter (tests of the tuned path on CPU):
    each config runs three times, as timing runs repeat a launch, and its wall time is its score."""
    import time

    t0 = time.perf_counter()
    for _ in range(3):
        kernel_call()
    t = (time.perf_counter() - t0) / 3
    return [t] * len(quantiles) if quantiles else t


def _interpreted_autotuned(fn):
    return _autotuned(fn, do_bench=_wall_clock_bench)


def _short_bench(kernel_call, quantiles):
    """Triton's ``do_bench`` with 5 ms of warm-up and 25 ms of timing per config (the defaults,
    25 and 100 ms, spend over half a second on each new shape for a kernel of 0.01 to 1 ms)."""
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


#: (NA and NB rounded up to powers of two, C, SPLIT, MASKED, EVEN_C, dtype, device) -> the
#: autotuner's choice, launched directly on later calls: the autotuner's own bookkeeping costs
#: about as much host time as a launch, and tuning every exact length would time five configs at
#: every layer of a ToMe schedule (the token count changes at each), where one choice per
#: power-of-two range serves them all.
_MATCH_BEST: dict = {}


def _auto_split(B: int, NA: int, NB: int, device) -> int:
    """Programs sharing the B tiles of one A tile.

    1 (the fused single-split kernel, no prologue launch) when the batch alone gives at least half
    a wave of 128-row A tiles and each scans few B tiles, or four waves whatever their length (at
    (32, 577, 1024) on an H100 one and two splits ran within 5 %). Else about four waves, at most
    8 splits (at (1, 25088, 1152): one split 1.9 ms, four to six 0.8 ms).
    """
    if device.type != "cuda":
        return 1
    programs = B * triton.cdiv(NA, 128)
    sms = _num_sms(device)
    if (2 * programs >= sms and NB <= 2048) or programs >= 4 * sms:
        return 1
    return max(1, min(8, triton.cdiv(NB, 256), triton.cdiv(4 * sms, programs)))


# --------------------------------------------------------------------------------------------
# counting kernels vs sorts
# --------------------------------------------------------------------------------------------


#: Above this many rows the counting kernels (the top r over N_A rows, the merge bookkeeping over
#: r pairs) give way to stable torch sorts, O(n log n) instead of n^2 comparisons (the top r: 0.08
#: ms at N_A = 12544 on an H100, four times that at twice the length). The bench shapes stay
#: below it; the crossover itself has not been timed on a GPU yet.
_COUNT_MAX = 16384
