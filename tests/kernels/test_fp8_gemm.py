"""The triton FP8 GEMM (interpreted on CPU) against the dequantize-then-matmul reference, for every recipe
and epilogue; the _scaled_mm path at tiny sizes; FP8 error against the unquantized product."""

import pytest
import torch

from loopline.kernels.epilogue import apply_epilogue
from loopline.kernels.fp8_gemm import (fp8_linear, reference_fp8_gemm, scaled_mm_fp8_gemm, triton_fp8_gemm,
                                       triton_interpreted, triton_supported)
from loopline.kernels.quant import RECIPES, quantize

GPU = pytest.mark.skipif(not triton_supported()[0], reason=f"compiled triton FP8: {triton_supported()[1]}")


def _operands(M, K, N, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    b = torch.randn(N, generator=g)
    return x.to(device), w.to(device), b.to(device)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("M,K,N", [(33, 200, 70), (16, 256, 300)], ids=["ragged", "two-norm-blocks"])
@pytest.mark.parametrize("act,norm", [("none", None), ("hardswish", 256), ("relu", None)],
                         ids=["plain", "hardswish+blocknorm", "relu"])
def test_triton_kernel_matches_the_reference(recipe, M, K, N, act, norm):
    x, w, b = _operands(M, K, N)
    a, wq = quantize(x, recipe, "act"), quantize(w, recipe, "weight")
    y = triton_fp8_gemm(a, wq, b if act != "relu" else None, act, norm, torch.float32)
    ref = reference_fp8_gemm(a, wq, b if act != "relu" else None, act, norm)
    assert y.shape == (M, N) and y.dtype == torch.float32
    # the same FP8 products summed in float32 in another order
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_product_is_within_fp8_tolerance_of_the_unquantized_one(recipe):
    x, w, b = _operands(64, 256, 128, seed=4)
    y = fp8_linear(x, w, b, recipe=recipe, library="triton", out_dtype=torch.float32)
    exact = x @ w.t() + b
    rel = float((y - exact).norm() / exact.norm())
    assert 0 < rel < 0.06, rel  # e4m3: ~2-4% relative error on Gaussian operands


def test_bf16_output_and_leading_dims():
    x, w, b = _operands(24, 64, 40, seed=5)
    y = fp8_linear(x.reshape(2, 12, 64), w, b, recipe="row", library="triton", out_dtype=torch.bfloat16)
    assert y.shape == (2, 12, 40) and y.dtype == torch.bfloat16
    ref = fp8_linear(x, w, b, recipe="row", library="reference", out_dtype=torch.float32)
    torch.testing.assert_close(y.float().reshape(24, 40), ref, rtol=1e-2, atol=1e-2)


def test_the_fused_blocknorm_normalizes_each_256_block_and_the_partial_tail():
    x, w, _ = _operands(8, 128, 300, seed=6)
    y = triton_fp8_gemm(quantize(x, "row"), quantize(w, "row", "weight"), None, "none", 256, torch.float32)
    rms = lambda t: t.pow(2).mean(dim=1).sqrt()  # noqa: E731
    torch.testing.assert_close(rms(y[:, :256]), torch.ones(8), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rms(y[:, 256:]), torch.ones(8), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("recipe", ["tensor", "row"])
def test_scaled_mm_path_matches_the_reference(recipe):
    x, w, b = _operands(16, 32, 16, seed=7)  # tiny: _scaled_mm on CPU is a slow reference path
    a, wq = quantize(x, recipe), quantize(w, recipe, "weight")
    out_dtype = torch.float32 if recipe == "tensor" else torch.bfloat16  # row-wise writes bf16
    y = scaled_mm_fp8_gemm(a, wq, b, out_dtype)
    torch.testing.assert_close(y.float(), reference_fp8_gemm(a, wq, b), rtol=1e-2, atol=2e-2)


def test_unsupported_combinations_raise_and_name_the_alternative():
    x, w, _ = _operands(8, 128, 16)
    with pytest.raises(ValueError, match="triton_fp8_gemm"):
        scaled_mm_fp8_gemm(quantize(x, "block"), quantize(w, "block", "weight"))
    with pytest.raises(ValueError, match="same recipe"):
        triton_fp8_gemm(quantize(x, "row"), quantize(w, "tensor", "weight"))
    with pytest.raises(ValueError, match="role='weight'"):
        triton_fp8_gemm(quantize(x, "block"), quantize(w, "block", "act"))
    with pytest.raises(ValueError, match="^library"):
        fp8_linear(x, w, library="cutlass")


def test_epilogue_order_is_act_of_norm_of_biased_output():
    y = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    b = torch.tensor([0.5, 0.5, -1.0, 0.0])
    z = y + b
    expected = torch.nn.functional.hardswish(z / z.pow(2).mean().add(1e-6).sqrt())
    torch.testing.assert_close(apply_epilogue(y, b, "hardswish", 256), expected)


def test_cpu_runs_the_kernel_interpreted():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the kernel is compiled")
    assert triton_interpreted() and not triton_supported()[0]


@GPU
@pytest.mark.parametrize("recipe", RECIPES)
def test_compiled_kernel_matches_the_reference_on_gpu(recipe):
    x, w, b = _operands(512, 1024, 768, device="cuda")
    a, wq = quantize(x, recipe, "act"), quantize(w, recipe, "weight")
    for act, norm in (("none", None), ("hardswish", 256)):
        y = triton_fp8_gemm(a, wq, b, act, norm, torch.float32)
        torch.testing.assert_close(y, reference_fp8_gemm(a, wq, b, act, norm), rtol=1e-3, atol=1e-3)


def _compile_for_sm90(scale_mode: int, norm: bool, act: int, block: tuple) -> dict:
    """Ahead-of-time compile of the kernel for an H100/H200 (sm_90) on this machine, with the
    specializations a real launch gets (unit inner strides, 16-divisible pointers and sizes)."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction  # not triton.jit: that is the interpreter under TRITON_INTERPRET=1

    from loopline.kernels import fp8_gemm

    body = fp8_gemm._fp8_gemm_body
    names = list(inspect.signature(body).parameters)
    sig = {n: "i32" for n in names}
    sig.update({"a_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "out_ptr": "*bf16", "sa_ptr": "*fp32", "sw_ptr": "*fp32",
                "bias_ptr": "*fp32", "eps": "fp32"})
    bm, bn, bk = block
    consts = dict(stride_ak=1, stride_wk=1, stride_on=1, SCALE_MODE=scale_mode, HAS_BIAS=True, ACT=act, NORM=norm,
                  SCALE_BLOCK=128, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
    sig.update({k: "constexpr" for k in consts})
    aligned = ["a_ptr", "w_ptr", "out_ptr", "sa_ptr", "sw_ptr", "bias_ptr", "M", "N", "K", "stride_am", "stride_wn",
               "stride_om"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    k = triton.compile(ASTSource(fn=JITFunction(body), signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3})
    return {"ptx": k.asm["ptx"], "shared": k.metadata.shared}


@pytest.mark.parametrize("scale_mode,norm,act,block", [(1, False, 0, (128, 128, 128)), (2, True, 1, (64, 256, 128))],
                         ids=["row", "block+blocknorm+hardswish"])
def test_kernel_compiles_for_h100_with_tensor_core_fp8_and_pipelined_loads(scale_mode, norm, act, block):
    pytest.importorskip("triton.backends.nvidia")
    k = _compile_for_sm90(scale_mode, norm, act, block)
    assert "wgmma.mma_async" in k["ptx"] and "e4m3" in k["ptx"]  # Hopper FP8 tensor-core MMA
    assert "cp.async" in k["ptx"] and k["shared"] > 2 * (block[0] + block[1]) * block[2]  # multi-stage pipeline
