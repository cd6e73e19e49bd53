"""Ahead-of-time compile gate: every Triton kernel configuration the GPU launchers use, compiled
for real GPU targets on a machine without a GPU.

For each (kernel, target, dtype, size) it compiles with ``triton.compile`` for the target, checks
that the kernel's shared memory fits the target's per-block opt-in maximum, and runs ptxas (shipped
with Triton) with ``-v`` on the PTX to read registers and spills: any spill fails the gate, and so
does ptxas output this module cannot parse. The configurations come from the launchers' own
``kernel_settings`` functions (no copied list), so this must run with the interpreter off: the
interpreter gets small, test-sized blocks. Run it as a script, not inside the test process:

    python -m mtbert.kernels.compile_check            # the representative subset (make test)
    python -m mtbert.kernels.compile_check --full     # the whole matrix (make compile-check)

It lives in the package, next to the kernels, because it needs their launch settings and is as
useful on a user's GPU-less build machine as in our tests. Prints a table; exits 1 on a failure.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

# (compute capability, per-block shared memory opt-in maximum in bytes, what runs it)
TARGETS = {
    "sm_90": (90, 232448, "H100/H200"),
    "sm_80": (80, 166912, "A100"),
    "sm_89": (89, 101376, "L4/RTX 40xx"),
    "sm_86": (86, 101376, "RTX 30xx/A10"),
}
DTYPES = ("float32", "float16", "bfloat16")
HEAD_DIMS = (16, 32, 64, 128)
LAYER_NORM_WIDTHS = (384, 768, 1024, 2048, 3072, 4096)
ATTENTION_KERNELS = ("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq")
KERNELS = ATTENTION_KERNELS + ("attention_bwd_delta", "add_layer_norm_fwd", "add_layer_norm_bwd", "bias_gelu_fwd",
                               "bias_gelu_bwd")

# Pointer arguments that are not in the input dtype, and scalar arguments that are not int32.
_FLOAT32_POINTERS = {"lse_ptr", "delta_ptr", "mean_ptr", "rstd_ptr", "weight_partial_ptr", "bias_partial_ptr"}
_INT32_POINTERS = {"cu_seqlens_ptr"}
_FLOAT_SCALARS = {"qk_scale", "softmax_scale", "dropout_p", "eps"}
_INT64_SCALARS = {"seed"}
_TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclass(frozen=True)
class Variant:
    """One compile: ``size`` is the head dim (attention) or row width N (LayerNorm; 0 for bias-GELU,
    whose blocks do not depend on N)."""
    kernel: str
    target: str
    dtype: str
    size: int = 0
    dropout: bool = False
    residual: bool = False
    maxnreg: int | None = None  # a register cap, only to show that the gate catches spills


@dataclass
class Result:
    variant: Variant
    blocks: str = ""
    registers: int | None = None
    shared: int | None = None
    spill_bytes: int | None = None
    seconds: float = 0.0
    problems: list = field(default_factory=list)


def parse_ptxas_log(log: str) -> tuple[int, int]:
    """(registers, spilled bytes = spill stores + spill loads) from ``ptxas -v`` output. Raises
    ValueError when either line is missing, so that a changed format fails the gate loudly."""
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or spills is None:
        raise ValueError(f"cannot parse the ptxas -v output:\n{log}")
    return int(registers.group(1)), int(spills.group(1)) + int(spills.group(2))


def _kernel_and_settings(variant: Variant):
    """The jit function and the settings its launcher passes (constexprs + num_warps/num_stages)."""
    import importlib

    import torch

    # import_module, not ``from . import``: the package's bias_gelu attribute is the dispatching function.
    attention, bias_gelu, layer_norm = (importlib.import_module(f"{__package__}.{name}")
                                        for name in ("attention", "bias_gelu", "layer_norm"))
    dtype = getattr(torch, variant.dtype)
    if variant.kernel in ATTENTION_KERNELS:
        fn = getattr(attention, f"_{variant.kernel}_kernel")
        return fn, attention.kernel_settings(dtype, variant.size, variant.dropout)
    if variant.kernel == "attention_bwd_delta":
        settings = attention.kernel_settings(dtype, variant.size, False)
        return attention._attention_bwd_delta_kernel, dict(HEAD_DIM=variant.size, BLOCK_M=settings["BLOCK_M"])
    if variant.kernel.startswith("add_layer_norm"):
        fn = getattr(layer_norm, f"_{variant.kernel}_kernel")
        return fn, layer_norm.kernel_settings(variant.size, variant.residual)
    return getattr(bias_gelu, f"_{variant.kernel}_kernel"), bias_gelu.kernel_settings()


def _signature(fn, constexprs, dtype):
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            element = ("fp32" if name in _FLOAT32_POINTERS else "i32" if name in _INT32_POINTERS
                       else _TRITON_TYPES[dtype])
            signature[name] = "*" + element
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned, as at launch
        else:
            signature[name] = "fp32" if name in _FLOAT_SCALARS else "i64" if name in _INT64_SCALARS else "i32"
    return signature, attrs


def compile_variant(variant: Variant) -> Result:
    """Compiles one variant for its target and checks shared memory and spills."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    started = time.perf_counter()
    capability, shared_limit, _ = TARGETS[variant.target]
    fn, settings = _kernel_and_settings(variant)
    options = {key: settings[key] for key in ("num_warps", "num_stages") if key in settings}
    constexprs = {key: value for key, value in settings.items() if key not in options}
    result = Result(variant, blocks=" ".join(f"{k}={v}" for k, v in settings.items()
                                             if k.startswith("BLOCK") or k.startswith("num_")))
    if variant.maxnreg is not None:
        options["maxnreg"] = variant.maxnreg
    signature, attrs = _signature(fn, constexprs, variant.dtype)
    try:
        compiled = triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                                            attrs=attrs),
                                  target=GPUTarget("cuda", capability, 32), options=options)
    except Exception as error:  # any compile error fails this variant, with Triton's message
        result.problems.append(f"does not compile: {type(error).__name__}: {str(error)[:2000]}")
        result.seconds = time.perf_counter() - started
        return result
    result.shared = compiled.metadata.shared
    if result.shared > shared_limit:
        result.problems.append(f"needs {result.shared} B of shared memory, more than the {shared_limit} B of "
                               f"{variant.target}")
    # ptxas -v as Triton itself calls it (make_cubin), on the PTX it produced.
    arch = sm_arch_from_capability(capability)
    with tempfile.TemporaryDirectory() as directory:
        ptx = os.path.join(directory, "kernel.ptx")
        with open(ptx, "w") as handle:
            handle.write(compiled.asm["ptx"])
        fmad = [] if compiled.metadata.enable_fp_fusion else ["--fmad=false"]
        run = subprocess.run([get_ptxas(capability).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={arch}", ptx, "-o", ptx + ".o"], capture_output=True, text=True)
    try:
        if run.returncode != 0:
            raise ValueError(f"ptxas failed ({run.returncode}): {run.stderr}")
        result.registers, result.spill_bytes = parse_ptxas_log(run.stdout + run.stderr)
    except ValueError as error:
        result.problems.append(str(error))
    else:
        if result.spill_bytes:
            result.problems.append(f"spills {result.spill_bytes} B of registers to local memory "
                                   f"({result.registers} registers)")
    result.seconds = time.perf_counter() - started
    return result


def full_matrix(targets=tuple(TARGETS)) -> list[Variant]:
    """Everything the launchers can run, the attention kernels first (the slow, large ones), each
    configuration on all targets in a row (so that a partial run covers every target)."""
    shapes = [(kernel, dtype, head_dim, dropout, False) for head_dim in reversed(HEAD_DIMS) for dtype in DTYPES
              for dropout in (True, False) for kernel in ATTENTION_KERNELS]
    shapes += [("attention_bwd_delta", dtype, head_dim, False, False) for head_dim in HEAD_DIMS for dtype in DTYPES]
    shapes += [(kernel, dtype, width, False, residual) for kernel in ("add_layer_norm_fwd", "add_layer_norm_bwd")
               for width in reversed(LAYER_NORM_WIDTHS) for dtype in DTYPES for residual in (True, False)]
    shapes += [(kernel, dtype, 0, False, False) for kernel in ("bias_gelu_fwd", "bias_gelu_bwd") for dtype in DTYPES]
    return [Variant(kernel, target, dtype, size, dropout, residual)
            for kernel, dtype, size, dropout, residual in shapes for target in targets]


def representative_subset() -> list[Variant]:
    """What ``make test`` compiles: every kernel on every target, in the configurations that were
    the full matrix's worst cases (compile_check.md): the attention kernels in float32 at head
    dim 128 with dropout (the most shared memory); the most registers of each attention kernel
    (forward: float32 at head dim 64; dK/dV: 16-bit at 32 with dropout; dQ: 16-bit at 128 with
    dropout); bias-GELU in float32 (the most registers overall); LayerNorm at N = 4096 with a
    residual; float16 and bfloat16 on alternate targets."""
    variants = []
    for target, half in zip(TARGETS, ("bfloat16", "float16", "bfloat16", "float16")):
        variants += [Variant(kernel, target, "float32", 128, dropout=True) for kernel in ATTENTION_KERNELS]
        variants += [Variant("attention_fwd", target, "float32", 64, dropout) for dropout in (False, True)]
        variants.append(Variant("attention_bwd_dkdv", target, half, 32, dropout=True))
        variants.append(Variant("attention_bwd_dq", target, half, 128, dropout=True))
        variants.append(Variant("attention_bwd_delta", target, half, 128))
        variants += [Variant(kernel, target, "float32", 4096, residual=True)
                     for kernel in ("add_layer_norm_fwd", "add_layer_norm_bwd")]
        variants += [Variant(kernel, target, "float32") for kernel in ("bias_gelu_fwd", "bias_gelu_bwd")]
    return variants


_COLUMNS = (("kernel", 19), ("target", 6), ("dtype", 8), ("head dim / N", 12), ("flag", 8), ("blocks", 46),
            ("regs", 4), ("shared B", 8), ("spill B", 7), ("s", 5), ("status", 6))


def table_header() -> str:
    return " | ".join(name.ljust(width) for name, width in _COLUMNS) + "\n" + "-+-".join(
        "-" * width for _, width in _COLUMNS)


def table_row(r: Result) -> str:
    """One row; flag is dropout (attention) or residual (LayerNorm)."""
    v = r.variant
    flag = "dropout" if v.dropout else "residual" if v.residual else "-"
    cells = (v.kernel, v.target, v.dtype, str(v.size or "any"), flag, r.blocks, str(r.registers), str(r.shared),
             str(r.spill_bytes), f"{r.seconds:.1f}", "FAIL" if r.problems else "ok")
    return " | ".join(cell.ljust(width) for cell, (_, width) in zip(cells, _COLUMNS))


def worst_cases(results: list[Result]) -> str:
    """Per target: the most registers, the most shared memory (and its limit), the most spills."""
    lines = []
    for target, (_, limit, gpus) in TARGETS.items():
        mine = [r for r in results if r.variant.target == target and r.registers is not None]
        if not mine:
            continue
        most_registers = max(mine, key=lambda r: r.registers)
        most_shared = max(mine, key=lambda r: r.shared)
        spills = max(r.spill_bytes for r in mine)

        def name(r):
            v = r.variant
            return f"{v.kernel} {v.dtype} {v.size or ''}{' dropout' if v.dropout else ''} ({r.blocks})"

        lines.append(f"{target} ({gpus}): max registers {most_registers.registers} [{name(most_registers)}]; "
                     f"max shared {most_shared.shared} B of {limit} B [{name(most_shared)}]; max spill {spills} B")
    return "\n".join(lines)


def run(variants: list[Variant], jobs: int):
    """Yields each variant's Result in order, as soon as it is compiled."""
    if jobs <= 1:
        yield from map(compile_variant, variants)
        return
    with ProcessPoolExecutor(jobs) as pool:
        yield from pool.map(compile_variant, variants)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the whole matrix instead of the representative subset")
    parser.add_argument("--jobs", type=int, default=2, help="compiles in parallel (default 2)")
    parser.add_argument("--kernel", action="append", choices=KERNELS, help="only this kernel (repeatable)")
    parser.add_argument("--target", action="append", choices=tuple(TARGETS), help="only this target (repeatable)")
    parser.add_argument("--maxnreg", type=int, help="cap registers per thread (to show that spills fail the gate)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET; the interpreter's block sizes are not the GPU's", file=sys.stderr)
        return 2
    variants = full_matrix() if args.full else representative_subset()
    variants = [Variant(**{**v.__dict__, "maxnreg": args.maxnreg}) for v in variants
                if (args.kernel is None or v.kernel in args.kernel)
                and (args.target is None or v.target in args.target)]
    if not variants:
        parser.error("no variant matches the --kernel/--target filters")
    started = time.perf_counter()
    print(table_header(), flush=True)
    results = []
    for result in run(variants, args.jobs):  # row by row, so that a long --full run shows progress
        print(table_row(result), flush=True)
        results.append(result)
    print()
    print(worst_cases(results))
    failures = [r for r in results if r.problems]
    for r in failures:
        print(f"FAIL {r.variant}: " + "; ".join(r.problems))
    print(f"{len(results)} kernels compiled in {time.perf_counter() - started:.0f} s, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
