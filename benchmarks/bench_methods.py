"""Every gradient-combination method at K = 3 and K = 10 task gradients of P = 22M entries (and
110M with BENCH_FULL=1), three ways on the same float32 [K, P] matrix, in the same run (medians):

- mtbert: ``combine_gradients`` -- C++ Gram pass (float64 accumulation), the K x K weighting,
  C++ combination pass;
- TorchJD 0.18: the method's aggregator applied to the matrix (Gram by matmul, its own solver,
  ``weights @ matrix``);
- plain torch: ``G = J @ J.T`` (matmul), mtbert's weighting, ``w @ J``.

Goals (issue 14): every mtbert method <= 1.3x mtbert's own PCGrad at the same K and P, and >= 2x
faster than TorchJD's aggregator. Before timing, mtbert's output is checked against the same
weighting on a float64 Gram and ``w @ J``. TorchJD is a benchmark/test dependency only.

    OMP_NUM_THREADS=2 python benchmarks/bench_methods.py [--rounds 5] [--methods mgda,upgrad] [--K 3,10]
"""
import argparse
import os
import statistics
import time
import warnings

import torch
from stacks import float64_gram  # the reference Gram of the check: see there

from mtbert.optim import combine_gradients, make_weighting

FULL = os.environ.get("BENCH_FULL") == "1"
SIZES = {"22M": 22_713_216} | ({"110M": 109_482_240} if FULL else {})  # MiniLM-L6, BERT-base parameters
METHODS = ("pcgrad", "sum", "mgda", "cagrad", "imtl-g", "aligned-mtl", "upgrad", "dualproj", "nash-mtl",
           "fairgrad", "gradvac")


def torchjd_aggregator(method: str, K: int):
    from torchjd import aggregation as jd

    return {"sum": jd.Sum, "pcgrad": jd.PCGrad, "mgda": jd.MGDA, "cagrad": lambda: jd.CAGrad(c=0.4),
            "imtl-g": jd.IMTLG, "aligned-mtl": jd.AlignedMTL, "upgrad": jd.UPGrad, "dualproj": jd.DualProj,
            "nash-mtl": lambda: jd.NashMTL(n_tasks=K), "fairgrad": lambda: jd.FairGrad(alpha=1.0),
            "gradvac": jd.GradVac}[method]()


def make_grads(K: int, numel: int, seed: int = 0) -> torch.Tensor:
    """K task gradients sharing a component of alternating sign: some pairs conflict."""
    generator = torch.Generator().manual_seed(seed)
    grads = torch.randn(K, numel, generator=generator)
    base = torch.randn(numel, generator=generator)
    for k in range(K):
        grads[k].add_(base, alpha=0.5 * (-1) ** k)
    return grads



def interleaved_medians(functions, rounds: int):
    """{name: median seconds}, the functions timed in turn within each round, so that a load change
    on a shared machine hits all of them alike."""
    for function in functions.values():
        function()  # warm-up
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def run(methods, Ks, rounds, sizes=SIZES):
    rows = []
    for size, numel in sizes.items():
        for K in Ks:
            grads = make_grads(K, numel)
            out = torch.empty(numel)
            pcgrad_weighting = make_weighting("pcgrad", generator=torch.Generator().manual_seed(0))

            def mtbert_pcgrad():
                combine_gradients(grads, out, pcgrad_weighting)

            for method in methods:
                # The same orders for PCGrad / GradVac in the mtbert and plain rows.
                weighting = make_weighting(method, generator=torch.Generator().manual_seed(0))
                aggregator = torchjd_aggregator(method, K)

                def mtbert():  # "sum" by name: no Gram pass
                    combine_gradients(grads, out, "sum" if method == "sum" else weighting)

                def plain():
                    gram = (grads @ grads.T).double()
                    return weighting(gram).float() @ grads

                def torchjd():
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        return aggregator(grads)

                check_weighting = make_weighting(method, generator=torch.Generator().manual_seed(1))
                result = combine_gradients(grads, out, check_weighting)
                expected = make_weighting(method, generator=torch.Generator().manual_seed(1))(
                    float64_gram(grads)).float() @ grads
                scale = (result.weights[0].abs().float() @ grads.norm(dim=1)).item()
                if (out - expected).norm() > 1e-3 * scale:
                    raise AssertionError(f"{method} K={K}: mtbert differs from the float64 reference by "
                                         f"{(out - expected).norm():.3g}")
                timings = interleaved_medians(dict(mtbert=mtbert, pcgrad=mtbert_pcgrad, torchjd=torchjd, plain=plain),
                                              rounds)
                rows.append(dict(size=size, K=K, method=method, **timings))
                print(f"{size} K={K:2d} {method:12s} mtbert {timings['mtbert'] * 1e3:8.1f} ms  "
                      f"(its PCGrad {timings['pcgrad'] * 1e3:8.1f} ms)  "
                      f"torchjd {timings['torchjd'] * 1e3:8.1f} ms  plain {timings['plain'] * 1e3:8.1f} ms", flush=True)
            del grads, out
    return rows


def table(rows) -> str:
    """Markdown: times, mtbert / mtbert's PCGrad (timed in the same rounds), TorchJD / mtbert."""
    lines = ["| P | K | method | mtbert ms | TorchJD ms | plain torch ms | mtbert / mtbert PCGrad | TorchJD / mtbert |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        own = r["mtbert"] / r["pcgrad"]
        lines.append(f"| {r['size']} | {r['K']} | {r['method']} | {r['mtbert'] * 1e3:.1f} | {r['torchjd'] * 1e3:.1f} | "
                     f"{r['plain'] * 1e3:.1f} | {own:.2f} | {r['torchjd'] / r['mtbert']:.1f}x |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per row (median)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--K", default="3,10", help="comma-separated task counts")
    parser.add_argument("--numel", type=int, help="P instead of 22M (and 110M): a quick smoke run")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose among {METHODS}")
    sizes = {f"{args.numel / 1e6:g}M": args.numel} if args.numel else SIZES
    rows = run(methods, [int(k) for k in args.K.split(",")], args.rounds, sizes)
    print(f"\ntorch threads: {torch.get_num_threads()}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
