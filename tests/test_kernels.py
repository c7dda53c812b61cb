"""vtok.kernels: torch references against hand-checked cases, Triton against torch on CPU.

The Triton kernels run under the Triton interpreter (TRITON_INTERPRET=1). ``triton.jit`` picks
compiled vs interpreted when a module is imported, which here may already have happened (pytest
imports everything at collection); ``vtok.kernels._common.launchable`` therefore builds the
interpreted kernel at launch time from the current value of the variable; the test session routes it
through ``tests/triton_interp.py``, which tolerates either import order, and
``test_interpreter_independent_of_import_order`` checks that (the shipped plain path is tested in a
fresh process by ``test_shipped_interpreter_path``). The variable is set at the top of
this module (before triton is imported, where that is still possible) only when there is no
CUDA device, so GPU runs of other test modules keep compiled kernels; the autouse fixture sets
it for the duration of each test here in any case.

Shapes are tiny (the interpreter runs every program in Python): N <= 33, C <= 24.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import vtok.kernels as K  # noqa: E402
from vtok.kernels import _common, attn_probe, greedy, indexing, match, tuning  # noqa: E402

from triton_interp import interpreted_any_import_order  # noqa: E402

pytestmark = pytest.mark.skipif(not _common.HAS_TRITON, reason="triton is not installed (Linux-only dependency)")

HYP = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Output tolerance of merged features: one rounding of the output dtype (both sides sum in fp32,
# in different orders, then round once).
FEAT_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("VTOK_KERNELS", raising=False)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _tokens(B, N, C, dtype, kind, seed, dup=True):
    """'int': small integers (exact dot products; ties are exact), with duplicated tokens.
    'float': Gaussian."""
    g = _gen(seed)
    if kind == "int":
        x = torch.randint(-2, 3, (B, N, C), generator=g).float()
        if dup and N >= 4:
            x[:, N - 1] = x[:, 1]  # an exact duplicate of a B token ...
            x[:, 2] = x[:, 0]  # ... and of an A token
    else:
        x = torch.randn(B, N, C, generator=g)
    return x.to(dtype)


def _cos64(x):
    xf = x.double()
    xn = xf / xf.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return xn @ xn.transpose(1, 2)


# =============================================================================================
# torch references: hand-checked cases and brute-force oracles
# =============================================================================================


def _five_tokens():
    # A = {0, 2, 4}, B = {1, 3}. cos(0,1) = 1, cos(2,3) = 1, cos(4,1) = cos(4,3) = 1/sqrt2.
    v = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1], [1, 1]])
    return v[None]


def test_bipartite_torch_five_tokens():
    m = _five_tokens()
    src, dst, sc = K.bipartite_match_torch(m, r=2)
    assert src.tolist() == [[0, 2]]  # both score 1.0: lowest index first
    assert dst.tolist() == [[1, 3]]
    assert torch.allclose(sc, torch.ones(1, 2))
    src, dst, sc = K.bipartite_match_torch(m, r=3)
    assert src.tolist() == [[0, 2, 4]]
    assert dst.tolist() == [[1, 3, 1]]  # token 4 ties between 1 and 3: lowest index
    assert sc[0, 2].item() == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    # r is clamped to the A count; a protected CLS (token 0) is never a source
    src, dst, _ = K.bipartite_match_torch(m, r=10, protected=1)
    assert src.tolist() == [[2, 4]] and dst.tolist() == [[3, 1]]
    # a protected destination (token 1) is not a destination either
    prot = torch.tensor([False, True, False, False, False])
    src, dst, _ = K.bipartite_match_torch(m, r=3, protected=prot)
    assert src.tolist() == [[2, 4, 0]] and dst.tolist() == [[3, 3, 3]]


def test_bipartite_torch_given_sets_and_no_destination():
    m = _five_tokens()
    src, dst, _ = K.bipartite_match_torch(m, r=1, a_idx=torch.tensor([4]))  # B = complement
    assert src.tolist() == [[4]] and dst.tolist() == [[0]]  # ties 0,1,2,3 at 1/sqrt2 -> 0
    src, dst, sc = K.bipartite_match_torch(m, r=2, protected=2)  # A={2,4} ok, B={3}
    assert src.tolist() == [[2, 4]] and dst.tolist() == [[3, 3]]
    e = K.bipartite_match_torch(m, r=2, protected=torch.tensor([False, True, False, True, False]))
    assert all(t.shape == (1, 0) for t in e)  # no admissible destination: nothing merges


def test_bipartite_torch_matches_bruteforce():
    x = _tokens(3, 21, 8, torch.float32, "float", 0)
    prot = torch.zeros(3, 21, dtype=torch.bool)
    prot[1, [0, 3, 4]] = True
    src, dst, sc = K.bipartite_match_torch(x, r=6, protected=prot)
    cos = _cos64(x)
    for b in range(3):
        A = [i for i in range(0, 21, 2) if not prot[b, i]]
        Bs = [j for j in range(1, 21, 2) if not prot[b, j]]
        best = {i: max(Bs, key=lambda j: (cos[b, i, j].item(), -j)) for i in A}
        order = sorted(A, key=lambda i: (-cos[b, i, best[i]].item(), i))[:6]
        assert src[b].tolist() == order
        assert dst[b].tolist() == [best[i] for i in order]
        assert torch.allclose(sc[b].double(), torch.tensor([cos[b, i, best[i]] for i in order]), atol=1e-6)


def test_torch_match_alternating_fast_path_equals_the_general_path():
    """The reference's mask-free path (alternating split, no or int protection) picks what the
    general path (masks from ``_split``, r clamped with a host sync) picks, ties included."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func.overloadpacket)
            return func(*args, **(kwargs or {}))

    g = _gen(3)
    for n, prot, r in ((9, 0, 3), (17, 1, 8), (16, 2, 5), (5, 4, 2), (1, 0, 1), (12, None, 4)):
        metric = torch.randn(3, n, 8, generator=g)
        if n > 5:
            metric[:, 3] = metric[:, 5]  # ties
        general = K.bipartite_match_torch(metric, r=r, protected=prot, a_idx=torch.arange(0, n, 2))
        seen = set()
        with Ops():
            fast = K.bipartite_match_torch(metric, r=r, protected=prot)
        assert all(torch.equal(a, b) for a, b in zip(fast, general)), (n, prot, r)
        assert torch.ops.aten._local_scalar_dense not in seen, (n, prot, r)  # no host sync
        assert (torch.ops.aten.masked_fill in seen) == bool(prot and general[0].numel()), (n, prot, r)

def test_merge_weighted_torch_hand_case():
    x = torch.tensor([1.0, 2, 3, 4, 5]).view(1, 5, 1)
    sizes = torch.tensor([[1.0, 1, 2, 1, 1]])
    xk, sk, kept = K.merge_weighted_torch(x, sizes, torch.tensor([[0, 2]]), torch.tensor([[1, 3]]))
    assert kept.tolist() == [[1, 3, 4]]
    assert torch.allclose(xk.flatten(), torch.tensor([1.5, 10 / 3, 5.0]))
    assert sk.tolist() == [[2.0, 3.0, 1.0]]
    # two sources into one destination, sizes None = ones, bf16 in -> bf16 out
    xk, sk, kept = K.merge_weighted_torch(x.bfloat16(), None, torch.tensor([[0, 4]]), torch.tensor([[2, 2]]))
    assert xk.dtype == torch.bfloat16 and kept.tolist() == [[1, 2, 3]]
    assert xk.float().flatten().tolist() == [2.0, 3.0, 4.0] and sk.tolist() == [[1.0, 3.0, 1.0]]


def test_nearest_merge_torch_hand_case():
    v = torch.tensor([[1.0, 0], [0, 1], [2, 0.1], [0.1, 3], [5, 0]])[None]  # 0,2,4 ~ e1; 1,3 ~ e2
    sizes = torch.tensor([[1.0, 1, 1, 2, 1]])
    xk, sk = K.nearest_merge_torch(v, sizes, torch.tensor([[0, 1]]))
    assert sk.tolist() == [[3.0, 3.0]]
    assert torch.allclose(xk[0, 0], (v[0, 0] + v[0, 2] + v[0, 4]) / 3)
    assert torch.allclose(xk[0, 1], (v[0, 1] + 2 * v[0, 3]) / 3)


def _greedy_oracle(x, k, mode, pivot, mask=None):
    """Plain Python, fp64, straight from the definitions (min distance / summed similarity)."""
    cos = _cos64(x)
    B, N, _ = x.shape
    out = []
    for b in range(B):
        valid = [mask is None or bool(mask[b, i]) for i in range(N)]
        sel = [int(pivot[b])]
        while len(sel) < min(k, sum(valid)):
            cand = [i for i in range(N) if valid[i] and i not in sel]
            if mode == "kcenter":
                score = {i: -min(1 - cos[b, i, c].item() for c in sel) for i in cand}
            else:
                score = {i: sum(cos[b, i, c].item() for c in sel) for i in cand}
            sel.append(min(cand, key=lambda i: (score[i], i)))
        out.append(sel + [-1] * (min(k, N) - len(sel)))
    return torch.tensor(out)


def test_greedy_torch_circle_kcenter():
    ang = torch.tensor([0.0, 20, 90, 180, 100]) * math.pi / 180
    x = torch.stack([ang.cos(), ang.sin()], -1)[None]
    assert K.greedy_select_torch(x, 5, mode="kcenter").tolist() == [[0, 3, 2, 1, 4]]
    assert K.greedy_select_torch(x, 2, mode="kcenter", pivot=torch.tensor([3])).tolist() == [[3, 0]]


@pytest.mark.parametrize("mode", ["kcenter", "maxsum"])
def test_greedy_torch_matches_oracle(mode):
    x = _tokens(3, 19, 6, torch.float32, "float", 1)
    mask = torch.ones(3, 19, dtype=torch.bool)
    mask[1, 15:] = False
    mask[2, :4] = False
    pivot = torch.tensor([5, 0, 4])
    got = K.greedy_select_torch(x, 17, mode=mode, pivot=pivot, mask=mask)
    assert got.tolist() == _greedy_oracle(x, 17, mode, pivot, mask).tolist()
    assert (got[1, 15:] == -1).all() and (got[1, :15] >= 0).all()


def test_greedy_torch_default_pivot_is_first_valid_token():
    x = _tokens(2, 9, 4, torch.float32, "float", 2)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :3] = False
    got = K.greedy_select_torch(x, 3, mode="maxsum", mask=mask)
    assert got[:, 0].tolist() == [0, 3]


def _attn_oracle(q, k, scale, allowed):
    """Full per-head softmax in fp64; allowed [B, M, Nk] or None; probs [B, Hq, M, Nk]."""
    B, Hq, M, d = q.shape
    kk = k.double().repeat_interleave(Hq // k.shape[1], dim=1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed[:, None], float("-inf"))
    p = torch.softmax(s, -1)
    return torch.nan_to_num(p, nan=0.0)


def test_attention_rows_torch_oracle_and_hand_case():
    # one head, two keys with scores 0 and log(3) -> probabilities 1/4, 3/4
    q = torch.tensor([[[[1.0, 0.0]]]])
    k = torch.tensor([[[[0.0, 0.0], [math.log(3.0), 0.0]]]])
    p = K.attention_rows_torch(q, k, scale=1.0)
    assert torch.allclose(p, torch.tensor([[[0.25, 0.75]]]))
    g = _gen(3)
    q = torch.randn(2, 4, 3, 8, generator=g)
    k = torch.randn(2, 2, 11, 8, generator=g)
    km = torch.rand(2, 11, generator=g) > 0.3
    pos = torch.tensor([[0, 5, 10], [2, 3, 4]])
    allowed = km[:, None, :] & (torch.arange(11)[None, None] <= pos[..., None])
    want = _attn_oracle(q, k, 8**-0.5, allowed).mean(1)
    got = K.attention_rows_torch(q, k, key_mask=km, causal_offset=pos)
    assert torch.allclose(got.double(), want, atol=1e-6)


def test_attention_colmean_torch_oracle():
    g = _gen(4)
    q = torch.randn(2, 4, 9, 8, generator=g)
    k = torch.randn(2, 2, 12, 8, generator=g)
    km = torch.rand(2, 12, generator=g) > 0.2
    qm = torch.rand(2, 9, generator=g) > 0.3
    qpos = torch.arange(9) + 3
    allowed = km[:, None, :] & (torch.arange(12)[None, None, :] <= qpos[None, :, None])
    p = _attn_oracle(q, k, 8**-0.5, allowed) * qm[:, None, :, None]
    want = p.sum((1, 2)) / (qm.sum(1) * 4)[:, None]
    for chunk in (1, 4, None):
        got = attn_probe._attention_colmean_torch(q, k, key_mask=km, query_mask=qm, causal=True, chunk=chunk)
        assert torch.allclose(got.double(), want, atol=1e-6)
    # without masks every row sums to one: the column means sum to one
    got = K.attention_colmean_torch(q, k)
    assert torch.allclose(got.sum(1), torch.ones(2), atol=1e-5)


# =============================================================================================
# Triton (interpreted) against torch
# =============================================================================================


def _protected(draw_kind, B, N, seed):
    if draw_kind == "none":
        return None
    if draw_kind == "int":
        return min(2, N)
    g = _gen(seed + 7)
    return torch.rand(B, N, generator=g) < 0.25


def _assert_match_equivalent(ref, tri, metric, protected, a_idx, exact):
    rs, rd, rsc = ref
    ts, td, tsc = tri
    assert ts.shape == rs.shape and td.shape == rd.shape and tsc.shape == rsc.shape
    assert ts.dtype == torch.long and td.dtype == torch.long and tsc.dtype == torch.float32
    if exact:
        assert torch.equal(ts, rs) and torch.equal(td, rd) and torch.equal(tsc, rsc)
        return
    tol = 1e-5
    assert torch.allclose(tsc, rsc, atol=tol)
    # Near-ties may pick a different but equally good pair: check optimality within tolerance.
    cos = _cos64(metric.float())
    B, N, _ = metric.shape
    pm = indexing._protected_mask(protected, B, N, metric.device)
    for b in range(B):
        srcs = ts[b].tolist()
        assert len(set(srcs)) == len(srcs)
        for s, d, sc in zip(srcs, td[b].tolist(), tsc[b].tolist()):
            assert pm is None or not (pm[b, s] or pm[b, d])
            assert abs(cos[b, s, d].item() - sc) < 1e-4
        if rs.shape[1]:
            assert min(tsc[b].tolist()) >= rsc[b, -1].item() - tol


@HYP
@given(
    B=st.integers(1, 3),
    N=st.integers(2, 33),
    C=st.integers(1, 24),
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(["int", "float"]),
    prot=st.sampled_from(["none", "int", "mask"]),
    split=st.sampled_from(["alternating", "given"]),
    r_frac=st.floats(0, 1.2),
    seed=st.integers(0, 2**16),
)
def test_bipartite_match_triton_vs_torch(B, N, C, dtype, kind, prot, split, r_frac, seed):
    x = _tokens(B, N, C, dtype, kind, seed)
    protected = _protected(prot, B, N, seed)
    a_idx = None
    if split == "given":
        a_idx = torch.randperm(N, generator=_gen(seed))[: max(1, N // 3)]
    r = int(r_frac * N)
    kw = dict(r=r, protected=protected, a_idx=a_idx)
    ref = K.bipartite_match_torch(x, **kw)
    tri = match._bipartite_match_triton(x, **kw, split=1 + seed % 3)
    _assert_match_equivalent(ref, tri, x, protected, a_idx, exact=(kind == "int"))


def test_bipartite_match_triton_multi_tile_ties():
    """Several A and B tiles (16 wide); identical B tokens in different tiles: lowest index wins,
    whichever program saw each copy."""
    x = _tokens(2, 70, 20, torch.float32, "int", 5)
    x[:, 63] = x[:, 3]  # B token 63 (tile 1 of B) duplicates B token 3 (tile 0)
    x[:, 45] = x[:, 3]
    ref = K.bipartite_match_torch(x, r=30)
    for split in (1, 2, 3):  # B tiles shared by 1, 2 or 3 programs; partial maxima meet in atomic_max
        tri = match._bipartite_match_triton(x, r=30, split=split)
        _assert_match_equivalent(ref, tri, x, None, None, exact=True)
        assert 63 not in tri[1].flatten().tolist() and 45 not in tri[1].flatten().tolist()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
@pytest.mark.parametrize(
    "kw",
    [dict(protected=1), dict(protected="mask"), dict(a_idx=torch.tensor([0, 2, 4, 5, 8, 10, 12]))],
    ids=["alternating", "mask", "given"],
)
def test_bipartite_match_nan_tokens_rank_last_on_both_backends(kw, monkeypatch):
    """A NaN (or infinite) token has NaN cosine similarities. They rank below every number: an A token
    never takes a NaN partner while it has another, an A token whose similarities are all NaN takes its
    lowest admissible B token and comes after every A token with a number (score NaN), so asking for every
    A token (as tome does) still gives a valid merge -- no protected token, no index out of range. Both
    backends agree exactly, and other samples match as if the NaN were not there."""
    clean = _tokens(3, 13, 6, torch.float32, "int", 3)
    x = clean.clone()
    x[1, 4, 2] = float("nan")  # an A token: all its similarities NaN
    x[1, 7, 0] = float("nan")  # a B token: a NaN column
    x[2, 2, 1] = float("inf")  # inf / ||inf||: NaN as well
    kw = dict(kw)
    if kw.get("protected") == "mask":
        kw["protected"] = torch.zeros(3, 13, dtype=torch.bool)
        kw["protected"][:, [0, 3]] = True
    r = 13
    ref = K.bipartite_match_torch(x, r=r, **kw)
    ref_clean = K.bipartite_match_torch(clean, r=r, **kw)
    assert all(torch.equal(t[0], c[0]) for t, c in zip(ref, ref_clean))  # sample 0 untouched by the others
    src, dst, sc = ref
    pm = indexing._protected_mask(kw.get("protected"), 3, 13, x.device)
    b_set = set(range(1, 13, 2)) if "a_idx" not in kw else set(range(13)) - set(kw["a_idx"].tolist())
    for b, bad_a, bad_b in ((1, 4, 7), (2, 2, None)):
        s, d, v = src[b].tolist(), dst[b].tolist(), sc[b]
        assert len(set(s)) == len(s) and all(t in b_set for t in d)
        assert pm is None or not any(pm[b, t] for t in s + d)
        if bad_a in s:  # the all-NaN row: last, with its lowest admissible B token
            i = s.index(bad_a)
            assert i == len(s) - 1 and torch.isnan(v[i])
            assert d[i] == min(t for t in b_set if pm is None or not pm[b, t])
        finite = [j for j, t in enumerate(s) if t != bad_a]
        assert not torch.isnan(v[finite]).any() and bad_b not in [d[j] for j in finite]
        assert torch.equal(v[finite], v[finite].sort(descending=True).values)
    for split in (1, 2):
        tri = match._bipartite_match_triton(x, r=r, **kw, split=split)
        assert torch.equal(tri[0], src) and torch.equal(tri[1], dst)
        torch.testing.assert_close(tri[2], sc, rtol=0, atol=0, equal_nan=True)
    monkeypatch.setattr(tuning, "_COUNT_MAX", 0)  # the sorted top r of long sequences
    tri = match._bipartite_match_triton(x, r=r, **kw)
    assert torch.equal(tri[0], src) and torch.equal(tri[1], dst)
    torch.testing.assert_close(tri[2], sc, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sort_paths_equal_counting_kernels(dtype, monkeypatch):
    """Long sequences take the top r by a torch sort of the keys, and the merge bookkeeping by
    torch sorts, instead of the counting kernels: the same pairs, scores and order (exact ties from
    duplicated tokens, protected rows) and the same merged tokens."""
    x = _tokens(2, 41, 12, dtype, "int", 11)
    x[:, 30] = x[:, 0]
    x[:, 33] = x[:, 1]
    mask = torch.rand(2, 41, generator=_gen(2)) < 0.2
    cases = (dict(r=15), dict(r=20, protected=3), dict(r=12, protected=mask),
             dict(r=9, a_idx=torch.randperm(41, generator=_gen(4))[:14]))
    keep = torch.tensor([0, 5, 17, 40])  # 37 sources into 4 destinations: many per destination
    pairs = K.bipartite_match_torch(x, r=37, b_idx=keep)[:2]
    sizes = torch.rand(2, 41, generator=_gen(5)) + 0.5
    counted = [K.bipartite_match_triton(x, **kw) for kw in cases]
    merged = K.merge_weighted_triton(x, sizes, *pairs)
    monkeypatch.setattr(tuning, "_COUNT_MAX", 0)  # read by the match and the merge
    for kw, c in zip(cases, counted):
        s = K.bipartite_match_triton(x, **kw)
        assert all(torch.equal(u, v) for u, v in zip(c, s)), kw
        _assert_match_equivalent(K.bipartite_match_torch(x, **kw), s, x, kw.get("protected"), kw.get("a_idx"),
                                 exact=True)
    # the merge bookkeeping by sorting: the same kernel inputs, so bit-identical outputs
    assert all(torch.equal(u, v) for u, v in zip(merged, K.merge_weighted_triton(x, sizes, *pairs)))


def test_bipartite_match_autotuned_path_on_cpu(monkeypatch):
    """The path a GPU takes, under the interpreter: the first call of a shape goes through Triton's
    autotuner (five configs, each launched three times into the same key buffer), later calls
    launch its choice directly. Both must return the same pairs as each other and as the
    reference; with split B tiles the keys are combined by atomic_max, so without the autotuner
    restoring them between configs the first call returns the maximum over configs (their fp32
    sums differ in the last bit: BLOCK_C 64 vs 128)."""
    monkeypatch.setattr(tuning, "_MATCH_BEST", {})
    interpreted_any_import_order.cache_clear()
    x = torch.randn(2, 130, 256, generator=_gen(3)).to(torch.bfloat16)
    a_idx = torch.arange(0, 130, 3)
    for kw in (dict(protected=1), dict(a_idx=a_idx)):  # the fast path; index sets with masks
        ref = K.bipartite_match_torch(x, r=30, **kw)
        for split in (3, 1):  # atomic_max over split programs; the fused single split (plain stores)
            tri = match._bipartite_match_triton(x, r=30, **kw, split=split, autotune=True)
            assert len(tuning._MATCH_BEST) > 0  # the autotuner ran and its choice was kept
            again = match._bipartite_match_triton(x, r=30, **kw, split=split, autotune=True)
            assert all(torch.equal(u, v) for u, v in zip(tri, again)), (kw.keys(), split)
            _assert_match_equivalent(ref, tri, x, kw.get("protected"), kw.get("a_idx"), exact=False)


@HYP
@given(
    B=st.integers(1, 3),
    N=st.integers(2, 33),
    C=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES),
    sizes_kind=st.sampled_from(["none", "ones", "random"]),
    seed=st.integers(0, 2**16),
)
def test_merge_weighted_triton_vs_torch(B, N, C, dtype, sizes_kind, seed):
    x = _tokens(B, N, C, dtype, "float", seed)
    g = _gen(seed + 1)
    sizes = None if sizes_kind == "none" else (
        torch.ones(B, N) if sizes_kind == "ones" else torch.rand(B, N, generator=g) * 3 + 0.5)
    src, dst, _ = K.bipartite_match_torch(x, r=N // 2)
    ref = K.merge_weighted_torch(x, sizes, src, dst)
    tri = K.merge_weighted_triton(x, sizes, src, dst)
    assert torch.equal(ref[2], tri[2])
    assert tri[0].dtype == dtype and tri[0].shape == (B, N - src.shape[1], C)
    assert torch.allclose(ref[0].float(), tri[0].float(), atol=FEAT_TOL[dtype], rtol=FEAT_TOL[dtype])
    assert torch.allclose(ref[1], tri[1], rtol=1e-6)


def test_merge_weighted_triton_many_sources_one_destination():
    x = _tokens(2, 9, 5, torch.float32, "float", 11)
    sizes = torch.arange(1.0, 19.0).view(2, 9)
    src = torch.tensor([[0, 2, 4, 6, 8], [8, 1, 5, 0, 2]])
    dst = torch.tensor([[1, 1, 1, 1, 3], [3, 3, 3, 3, 3]])
    ref = K.merge_weighted_torch(x, sizes, src, dst)
    tri = K.merge_weighted_triton(x, sizes, src, dst)
    for a, b in zip(ref, tri):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
    assert tri[2].tolist() == [[1, 3, 5, 7], [3, 4, 6, 7]]
    # 20 sources into one destination, in a long row
    x = _tokens(1, 41, 3, torch.float32, "float", 12)
    src = torch.arange(1, 41, 2)[None]
    dst = torch.zeros_like(src)
    ref = K.merge_weighted_torch(x, None, src, dst)
    tri = K.merge_weighted_triton(x, None, src, dst)
    for a, b in zip(ref, tri):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)



@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_merge_weighted_order_returns_survivors_in_that_order(backend):
    """``order=``: the survivors in that order (ToMe's), the same values as a gather of the
    index-ordered result, ``kept_idx = order``; a wrong shape is refused."""
    g = _gen(4)
    x, sizes = torch.randn(2, 9, 16, generator=g), torch.rand(2, 9, generator=g) + 0.5
    src, dst = torch.tensor([[0, 4, 6], [1, 2, 8]]), torch.tensor([[3, 5, 5], [7, 7, 0]])
    fn = K.merge_weighted_torch if backend == "torch" else K.merge_weighted_triton
    xk, sk, kept = fn(x, sizes, src, dst)
    perm = torch.stack([torch.randperm(6, generator=g) for _ in range(2)])
    order = kept.gather(1, perm)
    xo, so, ko = fn(x, sizes, src, dst, order)
    assert torch.equal(ko, order) and torch.equal(so, sk.gather(1, perm))
    assert torch.equal(xo, xk.gather(1, perm.unsqueeze(-1).expand(-1, -1, 16)))
    with pytest.raises(ValueError, match="order"):
        fn(x, sizes, src, dst, order[:, :3])
    with pytest.raises(ValueError, match="order"):
        fn(x, sizes, src, dst, order.float())

@HYP
@given(
    B=st.integers(1, 3),
    N=st.integers(2, 33),
    C=st.integers(1, 24),
    dtype=st.sampled_from(DTYPES),
    keep_frac=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
)
def test_nearest_merge_triton_vs_torch(B, N, C, dtype, keep_frac, seed):
    x = _tokens(B, N, C, dtype, "int", seed)  # exact similarities: identical assignments
    Kk = max(1, int(keep_frac * N))
    g = _gen(seed)
    keep = torch.stack([torch.sort(torch.randperm(N, generator=g)[:Kk]).values for _ in range(B)])
    sizes = torch.rand(B, N, generator=g) + 0.5
    ref = K.nearest_merge_torch(x, sizes, keep)
    tri = K.nearest_merge_triton(x, sizes, keep)
    assert tri[0].shape == (B, Kk, C) and tri[0].dtype == dtype
    assert torch.allclose(ref[0].float(), tri[0].float(), atol=FEAT_TOL[dtype], rtol=FEAT_TOL[dtype])
    assert torch.allclose(ref[1], tri[1], rtol=1e-6)
    assert torch.allclose(tri[1].sum(1), sizes.sum(1), rtol=1e-5)  # size is conserved


def _replay_greedy(x, idx, mode, mask, tol):
    """Each step's choice is optimal within ``tol`` given the previous choices (fp64)."""
    cos = _cos64(x.float())
    B, N, _ = x.shape
    for b in range(B):
        seq = [i for i in idx[b].tolist() if i >= 0]
        valid = torch.ones(N, dtype=torch.bool) if mask is None else mask[b]
        assert len(set(seq)) == len(seq) and all(bool(valid[i]) for i in seq)
        assert len(seq) == min(idx.shape[1], int(valid.sum()))
        for t in range(1, len(seq)):
            cand = [i for i in range(N) if valid[i] and i not in seq[:t]]
            sims = cos[b][cand][:, seq[:t]]
            score = sims.max(1).values if mode == "kcenter" else sims.sum(1)
            chosen = score[cand.index(seq[t])].item()
            assert chosen <= score.min().item() + tol


@HYP
@given(
    B=st.integers(1, 3),
    N=st.integers(1, 33),
    C=st.integers(1, 24),
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(["int", "float"]),
    mode=st.sampled_from(["kcenter", "maxsum"]),
    path=st.sampled_from(["regs", "gram", "stream"]),
    use_mask=st.booleans(),
    pivot_kind=st.sampled_from(["default", "given"]),
    k_frac=st.floats(0, 1.2),
    seed=st.integers(0, 2**16),
)
def test_greedy_select_triton_vs_torch(B, N, C, dtype, kind, mode, path, use_mask, pivot_kind, k_frac, seed):
    x = _tokens(B, N, C, dtype, kind, seed)
    g = _gen(seed)
    mask = None
    if use_mask:
        mask = torch.rand(B, N, generator=g) < 0.8
        mask[:, N // 2] = True  # at least one valid token per sample
    pivot = None
    if pivot_kind == "given":
        valid = torch.ones(B, N, dtype=torch.bool) if mask is None else mask
        pivot = torch.stack([torch.multinomial(valid[b].float(), 1, generator=g)[0] for b in range(B)])
    k = int(k_frac * N)
    ref = K.greedy_select_torch(x, k, mode=mode, pivot=pivot, mask=mask)
    tri = greedy._greedy_select_triton(x, k, mode=mode, pivot=pivot, mask=mask, path=path)
    assert tri.dtype == torch.long and tri.shape == ref.shape == (B, min(k, N))
    if kind == "int":
        assert torch.equal(tri, ref)
    else:
        assert torch.equal(tri[:, :1], ref[:, :1])
        _replay_greedy(x, tri, mode, mask, tol=1e-4 * max(1, k))
        assert torch.equal(tri < 0, ref < 0)


def test_greedy_select_triton_stream_multi_block_ties():
    """Scratch-state path with 16-wide blocks over N=40: cross-block ties go to the lowest index."""
    x = _tokens(2, 40, 12, torch.float16, "int", 9)
    x[:, 35] = x[:, 7]
    x[:, 20] = x[:, 7]
    for mode in ("kcenter", "maxsum"):
        ref = K.greedy_select_torch(x, 24, mode=mode)
        for path in ("stream", "gram", "regs"):
            assert torch.equal(greedy._greedy_select_triton(x, 24, mode=mode, path=path), ref), (mode, path)


@pytest.mark.parametrize("mode", ["kcenter", "maxsum"])
def test_greedy_select_skips_non_finite_tokens_on_both_backends(mode):
    """A token with a NaN or inf feature is never selected, by either backend, and the rest of the selection is
    the one with that token masked out; the default pivot moves past it, an explicit pivot on it is refused."""
    x = _tokens(3, 12, 8, torch.float32, "float", 4)
    x[0, 3, 1] = float("nan")
    x[1, 0, 2] = float("inf")  # the default pivot: the first finite token becomes it
    x[2, 5] = float("nan")
    finite = torch.isfinite(x).all(-1)
    want = K.greedy_select_torch(x.nan_to_num(0.0, 0.0, 0.0), 12, mode=mode, mask=finite)
    assert (want[:, -1] == -1).tolist() == [True, True, True]  # 11 valid tokens each
    got = K.greedy_select_torch(x, 12, mode=mode)
    assert torch.equal(got, want) and got[1, 0].item() == 1
    for path in ("regs", "gram", "stream"):
        assert torch.equal(greedy._greedy_select_triton(x, 12, mode=mode, path=path), want), path
    with pytest.raises(ValueError, match="non-finite"):
        K.greedy_select_torch(x, 4, mode=mode, pivot=torch.tensor([3, 2, 1]))


def _probe_inputs(B, Hkv, G, M, Nk, d, dtype, seed):
    g = _gen(seed)
    q = torch.randn(B, Hkv * G, M, d, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Nk, d, generator=g).to(dtype)
    return q, k, g


@HYP
@given(
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    G=st.integers(1, 3),
    R=st.integers(1, 5),
    Nk=st.integers(1, 37),
    d=st.integers(2, 24),
    dtype=st.sampled_from(DTYPES),
    key_mask=st.booleans(),
    causal=st.sampled_from(["none", "int", "tensor"]),
    seed=st.integers(0, 2**16),
)
def test_attention_rows_triton_vs_torch(B, Hkv, G, R, Nk, d, dtype, key_mask, causal, seed):
    q, k, g = _probe_inputs(B, Hkv, G, R, Nk, d, dtype, seed)
    km = (torch.rand(B, Nk, generator=g) < 0.75) if key_mask else None
    co = None
    if causal == "int":
        co = Nk - R
    elif causal == "tensor":
        co = torch.randint(-1, Nk + 1, (B, R), generator=g)
    ref = K.attention_rows_torch(q, k, key_mask=km, causal_offset=co)
    tri = attn_probe._attention_rows_triton(q, k, key_mask=km, causal_offset=co, lse_splits=1 + seed % 3)
    assert tri.shape == (B, R, Nk) and tri.dtype == torch.float32
    assert torch.allclose(ref, tri, atol=2e-6, rtol=1e-4)


@HYP
@given(
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    G=st.integers(1, 2),
    Nq=st.integers(1, 35),
    Nk=st.integers(1, 35),
    d=st.integers(2, 24),
    dtype=st.sampled_from(DTYPES),
    key_mask=st.booleans(),
    query_mask=st.booleans(),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_attention_colmean_triton_vs_torch(B, Hkv, G, Nq, Nk, d, dtype, key_mask, query_mask, causal, seed):
    q, k, g = _probe_inputs(B, Hkv, G, Nq, Nk, d, dtype, seed)
    km = (torch.rand(B, Nk, generator=g) < 0.75) if key_mask else None
    qm = (torch.rand(B, Nq, generator=g) < 0.75) if query_mask else None
    ref = K.attention_colmean_torch(q, k, key_mask=km, query_mask=qm, causal=causal)
    tri = K.attention_colmean_triton(q, k, key_mask=km, query_mask=qm, causal=causal)
    assert tri.shape == (B, Nk) and tri.dtype == torch.float32
    assert torch.allclose(ref, tri, atol=2e-6, rtol=1e-4)


def test_attention_probes_scale_and_noncontiguous_inputs():
    q, k, _ = _probe_inputs(2, 2, 2, 6, 19, 16, torch.float16, 12)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    ref = K.attention_rows_torch(q, k, scale=0.3)
    assert torch.allclose(K.attention_rows_triton(qt, kt, scale=0.3), ref, atol=2e-6)
    ref = K.attention_colmean_torch(q, k, scale=0.3, causal=True)
    assert torch.allclose(K.attention_colmean_triton(qt, kt, scale=0.3, causal=True), ref, atol=2e-6)


# =============================================================================================
# dispatch, environment variable, errors
# =============================================================================================


def test_dispatch_default_cpu_is_torch(monkeypatch):
    x = torch.randn(1, 5, 4)
    assert K.backend_for(x) == "torch"
    monkeypatch.setenv("VTOK_KERNELS", "auto")
    assert K.backend_for(x) == "torch"


def test_dispatch_env_forces_each_backend(monkeypatch):
    x = _tokens(2, 11, 6, torch.float32, "int", 3)
    calls = []
    monkeypatch.setattr(K, "bipartite_match_triton", lambda *a, **kw: calls.append("triton") or "T")
    monkeypatch.setattr(K, "bipartite_match_torch", lambda *a, **kw: calls.append("torch") or "R")
    monkeypatch.setenv("VTOK_KERNELS", "triton")
    assert K.bipartite_match(x, r=2) == "T"
    monkeypatch.setenv("VTOK_KERNELS", "torch")
    assert K.bipartite_match(x, r=2) == "R"
    assert calls == ["triton", "torch"]


def test_dispatch_public_functions_agree_across_backends(monkeypatch):
    x = _tokens(2, 13, 8, torch.float32, "int", 4)
    q, k, _ = _probe_inputs(2, 1, 2, 3, 13, 8, torch.float32, 4)
    keep = torch.tensor([[0, 3, 5, 12], [1, 2, 3, 4]])
    out = {}
    for be in ("torch", "triton"):
        monkeypatch.setenv("VTOK_KERNELS", be)
        m = K.bipartite_match(x, r=4, protected=1)
        out[be] = [
            *m,
            *K.merge_weighted(x, None, m[0], m[1]),
            *K.nearest_merge(x, None, keep),
            K.greedy_select(x, 5, mode="maxsum"),
            K.attention_rows(q, k),
            K.attention_colmean(q, k),
        ]
    for a, b in zip(out["torch"], out["triton"]):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


def test_dispatch_merge_with_grad_uses_torch(monkeypatch):
    x = torch.randn(1, 7, 4, requires_grad=True)
    src, dst, _ = K.bipartite_match(x, r=2)
    assert not src.requires_grad
    assert K.backend_for(x, needs_grad=True) == "torch"
    xk, _, _ = K.merge_weighted(x, None, src, dst)
    xk.sum().backward()
    assert torch.allclose(x.grad.sum(), torch.tensor(5 * 4.0))  # 5 kept rows; each averages to weight 1
    monkeypatch.setenv("VTOK_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="forward-only"):
        K.merge_weighted(x, None, src, dst)
    with torch.no_grad():
        K.merge_weighted(x, None, src, dst)  # fine without autograd


def test_dispatch_errors(monkeypatch):
    x = torch.randn(1, 5, 4)
    monkeypatch.setenv("VTOK_KERNELS", "cuda")
    with pytest.raises(ValueError, match="VTOK_KERNELS"):
        K.bipartite_match(x, r=1)
    monkeypatch.setenv("VTOK_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.bipartite_match(x, r=1)
    monkeypatch.delenv("VTOK_KERNELS")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.bipartite_match_triton(x, r=1)  # direct call on CPU without the interpreter


def test_interpreter_independent_of_import_order():
    """In the test session, interpreted launches work even when triton was imported before
    TRITON_INTERPRET=1 (pytest's conftest imports it here): tl.max/tl.sum, themselves @triton.jit,
    are swapped for interpreted twins during the launch and restored afterwards (tests/triton_interp.py)."""
    from triton.runtime.interpreter import InterpretedFunction

    import triton.language as tl

    kern = _common.launchable(match._match_kernel, torch.device("cpu"))
    assert isinstance(kern.fn, InterpretedFunction)
    assert _common.launchable(match._match_kernel, torch.device("cpu")) is kern  # cached
    before = tl.max
    x = _tokens(1, 9, 5, torch.float32, "int", 0)
    assert torch.equal(K.bipartite_match_triton(x, r=2)[0], K.bipartite_match_torch(x, r=2)[0])
    assert tl.max is before


_SHIPPED = """
import os, sys, torch
if sys.argv[1] == "before":
    os.environ["TRITON_INTERPRET"] = "1"
import triton  # noqa: F401
os.environ["TRITON_INTERPRET"] = "1"
import vtok.kernels as K
x = torch.randint(-3, 4, (1, 9, 5)).float()
try:
    tri = K.bipartite_match_triton(x, r=2)
except RuntimeError as e:
    print("ERROR", e)
else:
    print("EQUAL", torch.equal(tri[0], K.bipartite_match_torch(x, r=2)[0]))
"""


@pytest.mark.parametrize("order", ["before", "after"])
def test_shipped_interpreter_path(order):
    """The package itself uses Triton's plain interpreter, with no private patching: it works when
    TRITON_INTERPRET=1 is set before triton is imported, and says so clearly when it was set after."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VTOK_KERNELS")}
    out = subprocess.run([sys.executable, "-c", _SHIPPED, order], capture_output=True, text=True, env=env,
                         timeout=300).stdout  # fmt: skip
    if order == "before":
        assert out.strip().endswith("EQUAL True"), out
    else:
        assert "ERROR" in out and "before the first import of triton" in out, out


def test_autotuner_runs_once_per_length_range_over_a_tome_schedule(monkeypatch):
    """ToMe changes the token count at every layer; the autotuner must not time its configs at
    each. ViT-B/16 with r = 8: N = 197, 189, ..., 109 is twelve lengths in two power-of-two ranges
    of N_A / N_B, so two tuning runs and ten direct launches, every one of them exact."""
    monkeypatch.setattr(tuning, "_MATCH_BEST", {})
    interpreted_any_import_order.cache_clear()
    tuned = []
    real = match._match_tuner
    monkeypatch.setattr(match, "_match_tuner", lambda device: tuned.append(device) or real(device))
    x = _tokens(1, 197, 16, torch.float32, "int", 9)
    for n in range(197, 108, -8):
        ref = K.bipartite_match_torch(x[:, :n], r=8, protected=1)
        tri = match._bipartite_match_triton(x[:, :n], r=8, protected=1, split=2, autotune=True)
        _assert_match_equivalent(ref, tri, x[:, :n], 1, None, exact=True)
    assert len(tuned) == 2


def test_auto_split_policy(monkeypatch):
    """The measured split choice (H100, 132 SMs): the fused single split for ViT batches, about
    four waves of split programs for one long sequence; always 1 off CUDA."""
    monkeypatch.setattr(tuning, "_num_sms", lambda device: 132)
    cuda = torch.device("cuda")  # only its type is read; no GPU needed
    split = lambda B, N: tuning._auto_split(B, (N + 1) // 2, N // 2, cuda)  # noqa: E731
    assert split(32, 577) == 1 and split(32, 729) == 1  # ViT-L / SigLIP batches: no prologue launch
    assert split(1, 25088) == 6 and split(1, 6272) == 8  # video scale: B tiles over several programs
    assert split(64, 25088) == 1  # four waves of A tiles without splitting
    assert tuning._auto_split(1, 12544, 12544, torch.device("cpu")) == 1


def test_triton_signatures_are_the_references():
    """Each public ``*_triton`` takes exactly its reference's arguments: the knobs tests force code
    paths with live in private twins (``match._bipartite_match_triton``, ...), not in public
    signatures."""
    import inspect

    for name in K.__all__:
        if name.endswith("_triton"):
            tri = inspect.signature(getattr(K, name))
            ref = inspect.signature(getattr(K, name.removesuffix("_triton") + "_torch"))
            assert tri == ref, (name, tri, ref)
            assert not any(p.startswith("_") for p in tri.parameters), (name, tri)


def test_input_validation_errors():
    x = torch.randn(2, 7, 4)
    with pytest.raises(ValueError, match=r"\[B, N, C\]"):
        K.bipartite_match_torch(x[0], r=1)
    with pytest.raises(ValueError, match="protected"):
        K.bipartite_match_torch(x, r=1, protected=torch.zeros(3, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="r must be an int"):
        K.bipartite_match_torch(x, r=1.5)
    with pytest.raises(ValueError, match="mode"):
        K.greedy_select_torch(x, 3, mode="dpp")
    with pytest.raises(ValueError, match="pivot out of range"):
        K.greedy_select_torch(x, 3, pivot=torch.tensor([0, 9]))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 0] = False
    with pytest.raises(ValueError, match="masked"):
        K.greedy_select_torch(x, 3, pivot=torch.tensor([0, 0]), mask=mask)
    with pytest.raises(ValueError, match="multiple of key heads"):
        K.attention_rows_torch(torch.randn(1, 3, 1, 4), torch.randn(1, 2, 5, 4))
    with pytest.raises(ValueError, match="sizes"):
        K.merge_weighted_torch(x, torch.ones(2, 6), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="keep_idx is empty"):
        K.nearest_merge_torch(x, None, torch.zeros(2, 0, dtype=torch.long))


def test_zero_sizes_edge_cases():
    x = torch.randn(2, 1, 4)
    assert K.bipartite_match_triton(x, r=3)[0].shape == (2, 0)  # N=1: no B token
    assert K.greedy_select_triton(x, 0).shape == (2, 0)
    xk, sk, kept = K.merge_weighted_triton(x, None, *K.bipartite_match_triton(x, r=0)[:2])
    assert torch.equal(xk, x) and kept.tolist() == [[0], [0]]


# =============================================================================================
# benchmark plumbing (the timing itself needs a GPU)
# =============================================================================================


def test_bench_cases_run_and_agree_on_cpu():
    from vtok.kernels import bench

    cases = bench.build_cases([(2, 21, 32)], bench.KERNELS, torch.float32, torch.device("cpu"),
                              greedy_target=False, colmean_target=False)
    assert {c.kernel for c in cases} == set(bench.KERNELS)
    rows = []
    for c in cases:
        a, b = c.tri(), c.ref()
        if c.check is not None:
            assert c.check(a, b) == "ok", (c.kernel, c.params)
        rows.append((c, 1.0, 2.0, 0.5 if c.flops or c.nbytes else None, "", "ok"))
    md = bench.markdown(rows, "NVIDIA H100 80GB HBM3", torch.bfloat16, "table", 3.35e12, 989e12)
    assert md.count("\n| ") == len(rows) + 1 and "| 2.0x |" in md and "| 50 % |" in md
    # the match check looks at the pairs, not only the scores: shuffled partners do not pass
    match = next(c for c in cases if c.kernel == "match")
    src, dst, sc = match.ref()
    assert match.check((src, dst.flip(1), sc), (src, dst, sc)).startswith("pair scores off")


def test_bench_peaks_doc_and_cpu_exit(tmp_path, capsys):
    from vtok.kernels import bench

    bw, fl, _ = bench.device_peaks("NVIDIA H100 80GB HBM3", None, None)
    assert (bw, fl) == (3.35e12, 989e12)
    assert bench.device_peaks("NVIDIA H100 PCIe", None, None)[0] == 2.0e12
    assert bench.device_peaks("Mystery GPU", None, None)[0] is None
    assert bench.device_peaks("Mystery GPU", 100.0, 1.0)[:2] == (1e12, 100e12)
    doc = tmp_path / "B.md"
    doc.write_text(f"# T\n\nintro\n\n{bench.BEGIN}\npending\n{bench.END}\n\nfooter\n")
    bench.write_doc(str(doc), "| new |", append=False)
    text = doc.read_text()
    assert "pending" not in text and "| new |" in text and text.endswith("footer\n") and "intro" in text
    bench.write_doc(str(doc), "| newer |", append=True)
    assert "| new |" in doc.read_text() and doc.read_text().rstrip().endswith("| newer |")
    assert bench.parse_shapes("32,577,1024;(1, 6272, 1152)") == [(32, 577, 1024), (1, 6272, 1152)]
    if not torch.cuda.is_available():
        assert bench.main(["--shapes", "1,9,8"]) == 0
        assert "no CUDA device" in capsys.readouterr().out


# =============================================================================================
# GPU counterparts (skipped without CUDA): compiled Triton against torch at realistic sizes
# =============================================================================================

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_bipartite_and_merge(dtype, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    # a batch of ViT-L rows; one long row (several B splits; bf16 only: fp32 "ieee" autotuning of
    # six new keys took over two minutes on an H100)
    for B, N in ((4, 577), (1, 6273)) if dtype == torch.bfloat16 else ((4, 577),):
        x = torch.randn(B, N, 256, device="cuda", dtype=dtype)
        r = N // 4
        prot_mask = torch.zeros(N, dtype=torch.bool, device="cuda")
        prot_mask[:3] = True
        a_idx = torch.arange(0, N, 3, device="cuda")
        for kw in (dict(protected=1), dict(protected=prot_mask), dict(a_idx=a_idx)):  # fast path, masks, index sets
            ref = K.bipartite_match_torch(x, r=r, **kw)
            # automatic, the fused single-split kernel, three splits (bf16 only: fp32 "ieee" autotuning is slow)
            for split in (None, 1, 3) if dtype == torch.bfloat16 else (None,):
                tri = match._bipartite_match_triton(x, r=r, **kw, split=split)
                _assert_match_equivalent(ref, tri, x, kw.get("protected"), kw.get("a_idx"), exact=False)
                # the second call of a shape skips the autotuner (its choice is launched directly)
                again = match._bipartite_match_triton(x, r=r, **kw, split=split)
                assert all(torch.equal(u, v) for u, v in zip(tri, again))
        sizes = torch.rand(B, N, device="cuda") + 0.5
        a = K.merge_weighted_torch(x, sizes, ref[0], ref[1])
        b = K.merge_weighted_triton(x, sizes, ref[0], ref[1])
        assert torch.equal(a[2], b[2])
        assert torch.allclose(a[0].float(), b[0].float(), atol=FEAT_TOL[dtype], rtol=FEAT_TOL[dtype])
        assert torch.allclose(a[1], b[1], rtol=1e-6)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", ["kcenter", "maxsum"])
def test_gpu_greedy(mode, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randint(-3, 4, (2, 700, 64), device="cuda").to(torch.bfloat16)
    ref = K.greedy_select_torch(x, 70, mode=mode)
    for path in ("regs", "gram", "stream"):
        assert torch.equal(greedy._greedy_select_triton(x, 70, mode=mode, path=path), ref), path


@pytest.mark.gpu
@gpu
def test_gpu_attention_probes(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(2, 8, 300, 72, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 4, 300, 72, device="cuda", dtype=torch.bfloat16)
    assert torch.allclose(K.attention_colmean_triton(q, k, causal=True),
                          K.attention_colmean_torch(q, k, causal=True), atol=1e-5, rtol=1e-3)
    for splits in (None, 1, 5):  # automatic, one program per (head, row tile), keys over 5 programs
        assert torch.allclose(attn_probe._attention_rows_triton(q[:, :, -4:], k, causal_offset=296, lse_splits=splits),
                              K.attention_rows_torch(q[:, :, -4:], k, causal_offset=296), atol=1e-5, rtol=1e-3)
    q, k = q[:1, :, :16], torch.randn(1, 4, 9000, 72, device="cuda", dtype=torch.bfloat16)  # few rows, long keys
    assert torch.allclose(K.attention_rows_triton(q, k, causal_offset=8990),
                          K.attention_rows_torch(q, k, causal_offset=8990), atol=1e-6, rtol=1e-3)
