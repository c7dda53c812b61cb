"""GPU benchmark of the vtok kernels: Triton vs torch reference, and fraction of roofline.

``python -m vtok.kernels.bench`` (``main`` documents the command line, the timing and the roofline); the
figures of the last run are in ``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import sys
import time

import torch

from . import (
    attention_colmean_torch,
    attention_colmean_triton,
    attention_rows_torch,
    attention_rows_triton,
    bipartite_match_torch,
    bipartite_match_triton,
    greedy_select_torch,
    greedy_select_triton,
    merge_weighted_torch,
    merge_weighted_triton,
)

DEFAULT_SHAPES = [(32, 577, 1024), (32, 729, 1152), (1, 6272, 1152), (1, 6272, 3584), (1, 25088, 1152)]
#: ToDRE's target: n = 2880 visual tokens (LLaVA-NeXT), k = 288 (10 %), d = 4096.
GREEDY_TARGET = (1, 2880, 4096, 288)
#: HiPrune/HoliTom's target: 32 frames x 729 tokens x 16 heads (SigLIP so400m: d = 72).
COLMEAN_TARGET = (32, 729, 16, 72)
KERNELS = ["match+merge", "match", "merge", "greedy-kcenter", "greedy-maxsum", "attn-rows", "attn-colmean"]

#: name substring -> (HBM TB/s, dense bf16 TFLOP/s). Vendor datasheet figures.
PEAKS = [
    ("H100 NVL", 3.9, 835.0),
    ("H100 PCIe", 2.0, 756.0),
    ("H100", 3.35, 989.0),  # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    ("GH200", 4.0, 989.0),
    ("H200", 4.8, 989.0),
    ("A100-SXM4-80GB", 2.039, 312.0),
    ("A100 80GB PCIe", 1.935, 312.0),
    ("A100", 1.555, 312.0),  # 40 GB parts
    ("L40S", 0.864, 362.0),
    ("RTX 4090", 1.008, 165.0),
]


def device_peaks(name: str, tflops: float | None, tbps: float | None):
    """(bytes/s, FLOP/s, source) for a device name, with command-line overrides."""
    bw = fl = None
    src = "override"
    for key, b, f in PEAKS:
        if key in name:
            bw, fl, src = b, f, f"table entry '{key}'"
            break
    if tbps is not None:
        bw = tbps
    if tflops is not None:
        fl = tflops
    if bw is None or fl is None:
        return None, None, f"unknown device '{name}': pass --peak-tflops and --peak-tbps"
    return bw * 1e12, fl * 1e12, src


# ------------------------------------------------------------------------------------------
# baselines that are not the references
# ------------------------------------------------------------------------------------------


def tome_style_torch(x, sizes, r, protected=1):
    """ToMe's own recipe in torch (re-implemented): normalise in the input dtype, A.B^T GEMM in
    that dtype, row max/argmax, argsort, gather and scatter_add. A faster baseline than the fp32
    reference; shown so the speedup is not measured against a deliberately slow reference."""
    B, N, C = x.shape
    m = x / x.norm(dim=-1, keepdim=True)
    a, b = m[:, ::2], m[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    if protected:
        scores[:, 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    order = node_max.argsort(dim=-1, descending=True)[..., None]
    src_idx = order[:, :r]
    dst_idx = node_idx[..., None].gather(1, src_idx)
    xs = torch.cat([x * sizes[..., None], sizes[..., None]], -1).float()
    xa, xb = xs[:, ::2], xs[:, 1::2]
    unm = xa.gather(1, order[:, r:].expand(-1, -1, C + 1))
    src = xa.gather(1, src_idx.expand(-1, -1, C + 1))
    xb = xb.scatter_add(1, dst_idx.expand(-1, -1, C + 1), src)
    out = torch.cat([unm, xb], 1)
    return (out[..., :C] / out[..., C:]).to(x.dtype), out[..., C]


# ------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------


class Case:
    def __init__(self, kernel, shape, params, tri, ref, flops, nbytes, check=None, mem=False, note=""):
        self.kernel, self.shape, self.params = kernel, shape, params
        self.tri, self.ref, self.flops, self.nbytes = tri, ref, flops, nbytes
        self.check, self.mem, self.note = check, mem, note


def _heads(C):
    """(Hq, Hkv, d) for a width: ViT-L 1024 -> 16x64, SigLIP 1152 -> 16x72, Qwen2-7B 3584 -> 28/4 x 128."""
    if C == 3584:
        return 28, 4, 128
    return 16, 16, C // 16


def build_cases(shapes, kernels, dtype, device, greedy_target=True, colmean_target=True):
    es = torch.tensor([], dtype=dtype).element_size()
    cases = []
    g = torch.Generator(device=device).manual_seed(0)
    for B, N, C in shapes:
        shp = f"({B}, {N}, {C})"
        r = N // 4
        NA, NB = (N + 1) // 2, N // 2
        if any(k in kernels for k in ("match+merge", "match", "merge")):
            x = torch.randn(B, N, C, device=device, dtype=dtype, generator=g)
            sizes = torch.ones(B, N, device=device)
            src, dst, _ = bipartite_match_torch(x, r=r, protected=1)
            mflops = 2.0 * B * NA * NB * C
            if "match+merge" in kernels:
                def tri(x=x, sizes=sizes, r=r):
                    s, d, _ = bipartite_match_triton(x, r=r, protected=1)
                    return merge_weighted_triton(x, sizes, s, d)

                def ref(x=x, sizes=sizes, r=r):
                    s, d, _ = bipartite_match_torch(x, r=r, protected=1)
                    return merge_weighted_torch(x, sizes, s, d)

                nbytes = B * N * C * es * 2 + B * (N - r) * C * es
                cases.append(Case("match+merge", shp, f"r={r}, CLS protected", tri, ref, mflops, nbytes,
                                  check=lambda a, b: _close(a[0], b[0], dtype)))
                cases.append(Case("match+merge", shp, f"r={r}, vs ToMe-style torch (GEMM in {_dt_name(dtype)})",
                                  tri, lambda x=x, sizes=sizes, r=r: tome_style_torch(x, sizes, r), mflops, nbytes))
            if "match" in kernels:
                cases.append(Case("match", shp, f"r={r}", lambda x=x, r=r: bipartite_match_triton(x, r=r, protected=1),
                                  lambda x=x, r=r: bipartite_match_torch(x, r=r, protected=1), mflops, B * N * C * es,
                                  check=lambda a, b, x=x: _check_match(x, a, b)))
            if "merge" in kernels:
                cases.append(Case("merge", shp, f"r={r}", lambda x=x, s=sizes, a=src, b=dst: merge_weighted_triton(x, s, a, b),
                                  lambda x=x, s=sizes, a=src, b=dst: merge_weighted_torch(x, s, a, b),
                                  0.0, B * N * C * es + B * (N - r) * C * es,
                                  check=lambda a, b: _close(a[0], b[0], dtype)))
        for mode in ("kcenter", "maxsum"):
            if f"greedy-{mode}" in kernels:
                x = torch.randn(B, N, C, device=device, dtype=dtype, generator=g)
                k = max(1, N // 4)
                cases.append(_greedy_case(mode, x, k, shp, es))
        Hq, Hkv, d = _heads(C)
        if "attn-rows" in kernels:
            R = 16
            q = torch.randn(B, Hq, R, d, device=device, dtype=dtype, generator=g)
            kk = torch.randn(B, Hkv, N, d, device=device, dtype=dtype, generator=g)
            cases.append(Case("attn-rows", shp, f"Hq={Hq}, Hkv={Hkv}, d={d}, R={R}",
                              lambda q=q, k=kk: attention_rows_triton(q, k, causal_offset=k.shape[2] - R),
                              lambda q=q, k=kk: attention_rows_torch(q, k, causal_offset=k.shape[2] - R),
                              2.0 * B * Hq * R * N * d, B * Hkv * N * d * es + B * Hq * R * d * es + B * R * N * 4,
                              check=lambda a, b: _close(a, b, torch.float32, atol=1e-5)))
        if "attn-colmean" in kernels:
            cases.append(_colmean_case(B, N, Hq, Hkv, d, dtype, device, g, shp, es))
    if greedy_target and any(k.startswith("greedy") for k in kernels):
        B, N, D, k = GREEDY_TARGET
        x = torch.randn(B, N, D, device=device, dtype=dtype, generator=g)
        for mode in ("kcenter", "maxsum"):
            if f"greedy-{mode}" in kernels:
                cases.append(_greedy_case(mode, x, k, f"({B}, {N}, {D})", es, note="ToDRE target"))
    if colmean_target and "attn-colmean" in kernels:
        B, N, H, d = COLMEAN_TARGET
        cases.append(_colmean_case(B, N, H, H, d, dtype, device, g, f"({B}, {N}, {H * d})", es,
                                   note="HiPrune/HoliTom target"))
    return cases


def _greedy_case(mode, x, k, shp, es, note=""):
    B, N, D = x.shape
    # Algorithmic minimum: X read once, k mat-vecs.
    return Case(f"greedy-{mode}", shp, f"k={k}", lambda: greedy_select_triton(x, k, mode=mode),
                lambda: greedy_select_torch(x, k, mode=mode), 2.0 * B * k * N * D, B * N * D * es,
                check=lambda a, b: _frac_equal(a, b), note=note)


def _colmean_case(B, N, Hq, Hkv, d, dtype, device, g, shp, es, note=""):
    q = torch.randn(B, Hq, N, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, N, d, device=device, dtype=dtype, generator=g)
    return Case("attn-colmean", shp, f"H={Hq}, d={d}, Nq=Nk={N}", lambda: attention_colmean_triton(q, k),
                lambda: attention_colmean_torch(q, k), 2.0 * B * Hq * N * N * d,
                (B * Hq + B * Hkv) * N * d * es + B * N * 4,
                check=lambda a, b: _close(a, b, torch.float32, atol=1e-5), mem=True, note=note)


def _dt_name(dtype):
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def _close(a, b, dtype, atol=None):
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype] if atol is None else atol
    ok = torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)
    return "ok" if ok else f"max err {(a.float() - b.float()).abs().max().item():.2e}"


def _check_match(x, tri, ref, atol=1e-3):
    """Scores close to the reference's, and each returned pair really has its returned score (so a
    wrong partner index cannot pass on the scores alone)."""
    src, dst, score = tri
    gather = lambda idx: x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1])).float()  # noqa: E731
    cos = torch.nn.functional.cosine_similarity(gather(src), gather(dst), dim=-1)
    if not torch.allclose(cos, score, atol=atol):
        return f"pair scores off by {(cos - score).abs().max().item():.2e}"
    return _close(score, ref[2], torch.float32, atol=atol)


def _frac_equal(a, b):
    eq = (a == b).float().mean().item()
    return "ok" if eq == 1.0 else f"{eq:.1%} same picks"


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------


def _peak_extra_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def warm_up_gpu(seconds: float = 1.0) -> None:
    """Keep the GPU busy with bf16 GEMMs for ``seconds`` before the first timing.

    An idle GPU runs at a low clock (an H100 here read 345 MHz idle) and takes a while to ramp up;
    without this the first case of a run measured 2x slower than the same call one case later.
    """
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def run_gpu(cases, bw, fl, warmup, rep):
    from triton.testing import do_bench

    warm_up_gpu()
    rows = []
    for c in cases:
        print(f"  {c.kernel:14s} {c.shape:20s} {c.params}", file=sys.stderr, flush=True)
        out_t = c.tri()  # compiles / autotunes
        out_r = c.ref()
        check = c.check(out_t, out_r) if c.check else ""
        del out_t, out_r
        t_tri = do_bench(c.tri, warmup=warmup, rep=rep, return_mode="median")
        t_ref = do_bench(c.ref, warmup=warmup, rep=rep, return_mode="median")
        roof = None
        if bw is not None:
            roof = max(c.flops / fl, c.nbytes / bw) * 1e3
        mem = ""
        if c.mem:
            mem = f"{_peak_extra_mib(c.tri):.1f} / {_peak_extra_mib(c.ref):.1f}"
        rows.append((c, t_tri, t_ref, roof, mem, check))
        torch.cuda.empty_cache()
    return rows


def markdown(rows, device, dtype, peaks_src, bw, fl):
    lines = [
        f"Device: **{device}**; date {_dt.date.today().isoformat()}; torch {torch.__version__}; "
        f"triton {_triton_version()}; dtype {_dt_name(dtype)}.",
        "",
        f"Peaks: {('%.2f TB/s, %.0f TFLOP/s dense bf16 (%s)' % (bw / 1e12, fl / 1e12, peaks_src)) if bw else peaks_src}.",
        "",
        "| kernel | (B, N, C) | params | Triton ms | torch ms | speedup | roofline ms | % of roofline "
        "| extra peak MiB (Triton / torch) | check | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for c, t_tri, t_ref, roof, mem, check in rows:
        r_ms = f"{roof:.3f}" if roof is not None else "n/a"
        r_pc = f"{100 * roof / t_tri:.0f} %" if roof is not None else "n/a"
        lines.append(
            f"| {c.kernel} | {c.shape} | {c.params} | {t_tri:.3f} | {t_ref:.3f} | {t_ref / t_tri:.1f}x "
            f"| {r_ms} | {r_pc} | {mem} | {check} | {c.note} |"
        )
    return "\n".join(lines)


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:  # pragma: no cover
        return "n/a"


BEGIN, END = "<!-- vtok-bench:results -->", "<!-- /vtok-bench:results -->"


def write_doc(path, table, append):
    """Replace the block between the result markers of ``path`` (or append a section)."""
    try:
        text = open(path, encoding="utf-8").read()
    except FileNotFoundError:
        text = "# Kernel benchmarks\n\n"
    block = f"{BEGIN}\n{table}\n{END}"
    if not append and BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + table + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def run_cpu_torch(cases, reps=3):
    print("| kernel | (B, N, C) | params | torch (CPU) ms |\n|---|---|---|---:|")
    for c in cases:
        c.ref()  # warm-up
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            c.ref()
            ts.append((time.perf_counter() - t0) * 1e3)
        print(f"| {c.kernel} | {c.shape} | {c.params} | {sorted(ts)[len(ts) // 2]:.2f} |")


def parse_shapes(s):
    shapes = []
    for part in s.split(";"):
        vals = [int(v) for v in part.replace("(", "").replace(")", "").split(",") if v.strip()]
        if len(vals) != 3:
            raise argparse.ArgumentTypeError(f"a shape is B,N,C; got {part!r}")
        shapes.append(tuple(vals))
    return shapes


def main(argv=None):
    """GPU benchmark of the vtok kernels: Triton vs torch reference, and fraction of roofline.

        python -m vtok.kernels.bench                      # default shapes, bf16, markdown table on stdout
        python -m vtok.kernels.bench --out docs/BENCHMARKS.md   # also write the table into the doc
        python -m vtok.kernels.bench --shapes 32,577,1024 --kernels match+merge,greedy-kcenter

    Per kernel and shape it prints the Triton time, the torch-reference time, their ratio, and the
    fraction of roofline: ``t_roof / t_triton`` with ``t_roof = max(FLOPs / peak_FLOPs, bytes /
    peak_bandwidth)`` for the *algorithmic minimum* of work (each input read once, each output
    written once, FLOPs of one pass). Peaks come from a small table keyed by
    ``torch.cuda.get_device_name()`` (dense bf16 tensor-core FLOP/s and HBM bandwidth) or from
    ``--peak-tflops`` / ``--peak-tbps``. Times are medians of ``triton.testing.do_bench``.

    Without a CUDA device it says so and exits 0; ``--cpu-torch`` then times the torch references
    on CPU (use small ``--shapes``).
    """
    p = argparse.ArgumentParser(prog="python -m vtok.kernels.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=parse_shapes, default=DEFAULT_SHAPES,
                   help="';'-separated B,N,C triples (default: DEFAULT_SHAPES, CLIP-L/336 batch to video scale)")
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma list from {KERNELS}")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the dense bf16 peak (TFLOP/s)")
    p.add_argument("--peak-tbps", type=float, default=None, help="override the memory bandwidth peak (TB/s)")
    p.add_argument("--no-targets", action="store_true", help="skip the ToDRE greedy and 32x729 colmean targets")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    p.add_argument("--out", default=None, help="write the table into this markdown file (e.g. docs/BENCHMARKS.md)")
    p.add_argument("--append", action="store_true", help="append a section instead of replacing the marked block")
    p.add_argument("--cpu-torch", action="store_true", help="without CUDA: time the torch references on CPU")
    args = p.parse_args(argv)
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    bad = [k for k in kernels if k not in KERNELS]
    if bad:
        p.error(f"unknown kernels {bad}; choose from {KERNELS}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]

    if not torch.cuda.is_available():
        print("vtok.kernels.bench: no CUDA device is present; the Triton kernels need a GPU to be timed "
              "(their CPU equivalence tests run under TRITON_INTERPRET=1 in tests/test_kernels.py).")
        if args.cpu_torch:
            print("Timing the torch references on CPU instead:\n")
            cases = build_cases(args.shapes, kernels, dtype, torch.device("cpu"),
                                greedy_target=not args.no_targets, colmean_target=not args.no_targets)
            run_cpu_torch(cases)
        return 0

    device = torch.cuda.get_device_name()
    bw, fl, src = device_peaks(device, args.peak_tflops, args.peak_tbps)
    if args.dtype == "fp32" and bw is not None:
        src += "; NOTE: fp32 runs without tensor cores, the bf16 peak overstates the roofline"
    cases = build_cases(args.shapes, kernels, dtype, torch.device("cuda"),
                        greedy_target=not args.no_targets, colmean_target=not args.no_targets)
    rows = run_gpu(cases, bw, fl, args.warmup, args.rep)
    table = markdown(rows, device, dtype, src, bw, fl)
    print(table)
    if args.out:
        write_doc(args.out, table, args.append)
        print(f"\nwritten to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
