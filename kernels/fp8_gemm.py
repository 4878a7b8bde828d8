"""FP8 GEMM for ``y = x @ W.T``: a triton kernel with row-wise and block-wise scales and a fused epilogue,
the ``torch._scaled_mm`` path, and the dequantize-then-matmul reference.

Public surface: ``fp8_linear``, ``triton_fp8_gemm``, ``scaled_mm_fp8_gemm``, ``reference_fp8_gemm``,
``scaled_mm_supported``, ``triton_supported``, ``triton_interpreted``, ``LIBRARIES``.

Design.
- Operands: ``a`` (M, K) and ``w`` (N, K) are :class:`~loopline.kernels.quant.QTensor` in e4m3, both with
  the same recipe (``quant.RECIPES``); ``w`` is in nn.Linear layout, so the kernel reads it K-major.
- Accumulation is float32. Per-tensor and per-row scales are applied once, after the K loop
  (``acc * sa[:, None] * sw[None, :]``); block-wise scales change every 128 of K, so each 128-wide
  K step's partial product is scaled before it is added (``BLOCK_K`` divides 128 for that reason).
- Epilogue, fused, in float32 before the single store: ``act(norm(acc + bias))`` (see
  ``kernels.epilogue``). BlockNorm needs a whole 256-wide norm block in one tile, so with ``norm_block``
  the tile's ``BLOCK_N`` is the norm block (or the whole width when N is smaller).
- Output dtype: bfloat16 by default (what serving consumes), float32 on request.
- On a machine without a CUDA GPU the kernel runs under triton's interpreter (``TRITON_INTERPRET``
  semantics, on CPU tensors): that is for testing correctness, it is far slower than anything else.
  :func:`triton_interpreted` says which mode is in use. On a GPU, the tile shape is picked per problem
  shape by timing a few configurations once (cached).
- ``torch._scaled_mm`` (cuBLASLt FP8) takes per-tensor and row-wise scales; block-wise scaling there is
  not offered (a ``ConfigError``, also a ``ValueError``, naming the triton path). It needs FP8 tensor
  cores (compute capability 8.9+) to be fast; it also runs on CPU as a slow reference, which the tests
  use at tiny sizes.
- Errors: a bad argument raises :class:`~loopline.errors.ConfigError` whose message starts with the
  argument's name; a tile search on a GPU where no configuration runs raises
  :class:`~loopline.errors.KernelError`. Both are ``LooplineError``s, so the CLI prints them in one line.
- The reference dequantizes both operands to float32 and multiplies: the ground truth the kernels are
  tested against, and the "emulated" FP8 path on hardware without FP8.

>>> import torch
>>> from loopline.kernels.quant import quantize
>>> x, w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)), torch.eye(64)[:8]
>>> y = reference_fp8_gemm(quantize(x, "row"), quantize(w, "row", "weight"))
>>> y.shape, float((y - x[:, :8]).abs().max()) < 0.1 * float(x.abs().max())
(torch.Size([4, 8]), True)
"""

from __future__ import annotations

import os
import time

import torch
import triton
import triton.language as tl

from loopline.errors import ConfigError, KernelError

from .epilogue import ACTIVATIONS, NORM_EPS, apply_epilogue
from .quant import BLOCK, QTensor, dequantize, quantize

__all__ = ["fp8_linear", "triton_fp8_gemm", "scaled_mm_fp8_gemm", "reference_fp8_gemm", "scaled_mm_supported",
           "triton_supported", "triton_interpreted", "LIBRARIES"]

LIBRARIES = ("triton", "scaled_mm", "reference")
_SCALE_MODE = {"tensor": 0, "row": 1, "block": 2}
_ACT = {"none": 0, "hardswish": 1, "relu": 2}


def _fp8_gemm_body(a_ptr, w_ptr, out_ptr, sa_ptr, sw_ptr, bias_ptr, M, N, K,
                   stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on,
                   stride_sam, stride_sak, stride_swn, stride_swk, eps,
                   SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                   NORM: tl.constexpr, SCALE_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped tile order: GROUP_M row-tiles share the same W columns while they are in L2
    pid = tl.program_id(0)
    # only triton builtins in here (no tl.cdiv / tl.sum, which are @jit helpers): the same body then runs
    # compiled, or interpreted on CPU however and whenever triton was first imported
    n_m = (M + BLOCK_M - 1) // BLOCK_M
    n_n = (N + BLOCK_N - 1) // BLOCK_N
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    offs_k = tl.arange(0, BLOCK_K)  # (BK,)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BM, BK)
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # (BK, BN): W read K-major

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & mask_n[None, :], other=0.0)
        if SCALE_MODE == 2:
            kb = k0 // SCALE_BLOCK
            sa = tl.load(sa_ptr + offs_m * stride_sam + kb * stride_sak, mask=mask_m, other=0.0)  # (BM,)
            sw = tl.load(sw_ptr + (offs_n // SCALE_BLOCK) * stride_swn + kb * stride_swk, mask=mask_n, other=0.0)
            acc += tl.dot(a, w) * sa[:, None] * sw[None, :]
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    if SCALE_MODE == 0:
        acc = acc * (tl.load(sa_ptr) * tl.load(sw_ptr))
    elif SCALE_MODE == 1:
        sa = tl.load(sa_ptr + offs_m * stride_sam, mask=mask_m, other=0.0)
        sw = tl.load(sw_ptr + offs_n * stride_swn, mask=mask_n, other=0.0)
        acc = acc * sa[:, None] * sw[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if NORM:
        # the tile is exactly one norm block (or all of a narrower N): RMS over its valid columns
        acc = tl.where(mask_n[None, :], acc, 0.0)
        width = tl.minimum(N - pid_n * BLOCK_N, BLOCK_N)
        ms = tl.reduce(acc * acc, 1, tl.standard._sum_combine) / width
        acc = acc / tl.sqrt(ms + eps)[:, None]
    if ACT == 1:
        acc = acc * tl.minimum(tl.maximum(acc + 3.0, 0.0), 6.0) / 6.0
    elif ACT == 2:
        acc = tl.maximum(acc, 0.0)
    o_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# -- mode and compilation -------------------------------------------------------------------------------
_KERNEL = None
_TUNED: dict = {}


def triton_interpreted() -> bool:
    """True when the kernel runs under triton's CPU interpreter (no CUDA GPU, or TRITON_INTERPRET=1)."""
    return not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_supported() -> tuple[bool, str]:
    """Whether the compiled triton kernel can run fast here, with the reason when it cannot."""
    if triton_interpreted():
        return False, "no CUDA GPU: triton runs only interpreted on CPU (for tests, far too slow to serve)"
    if torch.cuda.get_device_capability() < (8, 9):
        return False, f"FP8 tensor cores need compute capability 8.9+, this GPU is {torch.cuda.get_device_capability()}"
    return True, "compiled for " + torch.cuda.get_device_name()


def scaled_mm_supported() -> tuple[bool, str]:
    """Whether ``torch._scaled_mm`` has FP8 hardware behind it here (it also runs on CPU, slowly)."""
    if not hasattr(torch, "_scaled_mm"):
        return False, "this torch has no _scaled_mm"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU: _scaled_mm on CPU is a slow reference path, not FP8 hardware"
    if torch.cuda.get_device_capability() < (8, 9):
        return False, f"FP8 tensor cores need compute capability 8.9+, this GPU is {torch.cuda.get_device_capability()}"
    return True, "cuBLASLt FP8 on " + torch.cuda.get_device_name()


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        if triton_interpreted():
            # built directly as an interpreted function, so no process-wide environment change is needed
            from triton.runtime.interpreter import InterpretedFunction
            _KERNEL = InterpretedFunction(_fp8_gemm_body)
        else:
            _KERNEL = triton.jit(_fp8_gemm_body)
    return _KERNEL


def _configs(M: int, N: int, norm_n: int | None, interpreted: bool) -> list[dict]:
    """Candidate tiles: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). BLOCK_K divides 128."""
    if norm_n is not None:
        bn = norm_n
        return ([dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=32)] if interpreted else
                [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, num_warps=w, num_stages=s)
                 for bm, w, s in ((64, 8, 3), (128, 8, 3), (64, 4, 4))])
    if interpreted:
        return [dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)]
    small = [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
             dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4)]
    large = [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=4),
             dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=3),
             dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3)]
    return small + (large if M * N >= 512 * 512 else large[:1])


def _launch(a: QTensor, w: QTensor, out, bias, act_code: int, norm: bool, cfg: dict):
    M, K = a.shape
    N = w.shape[0]
    sa, sw = a.scale, w.scale
    if a.recipe == "tensor":
        strides = (0, 0, 0, 0)
    elif a.recipe == "row":
        strides = (sa.stride(0), 0, sw.stride(0), 0)
    else:
        strides = (sa.stride(0), sa.stride(1), sw.stride(0), sw.stride(1))
    meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    launch = {k: v for k, v in cfg.items() if k in ("num_warps", "num_stages")}
    grid = (-(-M // meta["BLOCK_M"]) * -(-N // meta["BLOCK_N"]),)
    _kernel()[grid](a.data, w.data, out, sa, sw, bias if bias is not None else out, M, N, K,
                    a.data.stride(0), a.data.stride(1), w.data.stride(0), w.data.stride(1),
                    out.stride(0), out.stride(1), *strides, NORM_EPS,
                    SCALE_MODE=_SCALE_MODE[a.recipe], HAS_BIAS=bias is not None, ACT=act_code, NORM=norm,
                    SCALE_BLOCK=BLOCK, GROUP_M=8, **meta, **launch)


def _check(a: QTensor, w: QTensor, act: str) -> None:
    if a.recipe != w.recipe:
        raise ConfigError(f"recipe: both operands need the same recipe, got {a.recipe!r} and {w.recipe!r}")
    if a.shape[1] != w.shape[1]:
        raise ConfigError(f"shape: inner dimensions differ, {tuple(a.shape)} @ {tuple(w.shape)}.T")
    if a.recipe == "block" and (a.group != (1, BLOCK) or w.group != (BLOCK, BLOCK)):
        raise ConfigError(f"recipe: block-wise needs 1x{BLOCK} activations and {BLOCK}x{BLOCK} weights, "
                          f"got {a.group} and {w.group}; quantize with role='act' / role='weight'")
    if act not in ACTIVATIONS:
        raise ConfigError(f"act: one of {ACTIVATIONS}, got {act!r}")


def triton_fp8_gemm(a: QTensor, w: QTensor, bias: torch.Tensor | None = None, act: str = "none",
                    norm_block: int | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``act(norm(dequant(a) @ dequant(w).T + bias))`` in one triton kernel; (M, N) in ``out_dtype``."""
    _check(a, w, act)
    M, N = a.shape[0], w.shape[0]
    norm_n = None
    if norm_block:
        if N > norm_block and norm_block & (norm_block - 1):
            raise ConfigError(f"norm_block: the fused BlockNorm needs a power-of-two block, got {norm_block}; "
                              "apply kernels.epilogue.block_rms_norm after the GEMM instead")
        norm_n = norm_block if N > norm_block else max(16, 1 << (N - 1).bit_length())
    out = torch.empty(M, N, dtype=out_dtype, device=a.data.device)
    if bias is not None:
        bias = bias.contiguous()
    interp = triton_interpreted()
    configs = _configs(M, N, norm_n, interp)
    key = (M, N, a.shape[1], a.recipe, bias is not None, act, norm_n, out_dtype)
    if key not in _TUNED:
        if len(configs) == 1:
            _TUNED[key] = configs[0]
        else:  # time each tile once on this problem shape, keep the fastest
            best = None
            for cfg in configs:
                try:
                    _launch(a, w, out, bias, _ACT[act], norm_n is not None, cfg)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(5):
                        _launch(a, w, out, bias, _ACT[act], norm_n is not None, cfg)
                    torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                except Exception:  # a tile that does not fit this GPU's shared memory
                    continue
                if best is None or dt < best[0]:
                    best = (dt, cfg)
            if best is None:
                raise KernelError(f"triton_fp8_gemm: no tile configuration ran for shape {key[:3]}")
            _TUNED[key] = best[1]
    _launch(a, w, out, bias, _ACT[act], norm_n is not None, _TUNED[key])
    return out


def scaled_mm_fp8_gemm(a: QTensor, w: QTensor, bias: torch.Tensor | None = None,
                       out_dtype: torch.dtype = torch.bfloat16, fast_accum: bool = False) -> torch.Tensor:
    """``torch._scaled_mm`` with per-tensor or row-wise scales; bias added by the library."""
    _check(a, w, "none")
    if a.recipe == "block":
        raise ConfigError("recipe: _scaled_mm is used with 'tensor' and 'row' scales here; "
                          "use triton_fp8_gemm for block-wise scaling")
    sa = a.scale.reshape(1, 1) if a.recipe == "tensor" else a.scale  # (1, 1) | (M, 1)
    sw = w.scale.reshape(1, 1) if w.recipe == "tensor" else w.scale.reshape(1, -1)  # (1, 1) | (1, N)
    if a.recipe == "tensor":
        sa, sw = sa.reshape(()), sw.reshape(())
    b = None if bias is None else bias.to(out_dtype)
    return torch._scaled_mm(a.data, w.data.t(), scale_a=sa, scale_b=sw, bias=b, out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


def reference_fp8_gemm(a: QTensor, w: QTensor, bias: torch.Tensor | None = None, act: str = "none",
                       norm_block: int | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize both operands to float32, multiply, apply the epilogue in float32."""
    _check(a, w, act)
    return apply_epilogue(dequantize(a) @ dequantize(w).t(), bias, act, norm_block).to(out_dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, recipe: str = "row",
               library: str = "triton", act: str = "none", norm_block: int | None = None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``nn.functional.linear`` through FP8: quantizes ``x`` (..., K) and ``weight`` (N, K) with ``recipe``
    and multiplies with ``library`` (one of ``LIBRARIES``). Leading dims of ``x`` are kept."""
    lead = x.shape[:-1]
    out_dtype = out_dtype or x.dtype
    a = quantize(x.reshape(-1, x.shape[-1]), recipe, "act")
    wq = quantize(weight, recipe, "weight")
    if library == "triton":
        y = triton_fp8_gemm(a, wq, bias, act, norm_block, out_dtype)
    elif library == "reference":
        y = reference_fp8_gemm(a, wq, bias, act, norm_block, out_dtype)
    elif library == "scaled_mm":
        if act != "none" or norm_block:
            raise ConfigError("act: _scaled_mm has no fused epilogue; use library='triton' or apply "
                              "kernels.epilogue.apply_epilogue after it")
        y = scaled_mm_fp8_gemm(a, wq, bias, out_dtype)
    else:
        raise ConfigError(f"library: one of {LIBRARIES}, got {library!r}")
    return y.reshape(*lead, weight.shape[0])
