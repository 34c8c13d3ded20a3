"""Every kernel compiles for sm_90 (H100/H200) with the real Triton compiler, no GPU needed.

The interpreter accepts programs that the compiler rejects (and vice versa), so this runs the
frontend, the NVIDIA lowering and the bundled ptxas, in a subprocess without TRITON_INTERPRET.
"""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="Triton is not installed")

SCRIPT = textwrap.dedent('''
    import inspect
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from idemrt.kernels import gdn, groupnorm_silu as gn, loss_seed as ls, sampler_update as su

    def build(fn, constexprs, types=None):
        names = list(inspect.signature(fn.fn).parameters)
        types = dict(eps="fp32", group_size="fp32", step_ptr="*i64", mask_ptr="*u8", **(types or {}))
        sig = {n: "constexpr" if n in constexprs else types.get(n, "*fp32" if n.endswith("_ptr") else "i32")
               for n in names}
        src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()})
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        print("compiled", fn.fn.__name__)

    bf16 = dict(x_ptr="*bf16", y_ptr="*bf16", dy_ptr="*bf16", dx_ptr="*bf16", scale_ptr="*bf16", shift_ptr="*bf16")
    build(gn._gn_stats_kernel, dict(BLOCK_C=4, BLOCK_HW=512), bf16)
    build(gn._gn_fwd_kernel, dict(HAS_FILM=True, SPLIT_P2=32, BLOCK_C=4, BLOCK_HW=512), bf16)
    build(gn._gn_bwd_reduce_kernel, dict(HAS_FILM=True, BLOCK_C=4, BLOCK_HW=512))
    build(gn._gn_bwd_dx_kernel, dict(HAS_FILM=False, SPLIT_P2=2, BLOCK_C=16, BLOCK_HW=128))
    blocks = dict(BLOCK_CO=64, BLOCK_CI=32, BLOCK_P=64)
    build(gdn._gdn_fwd_kernel, dict(INVERSE=True, PRECISION="tf32x3", **blocks))
    build(gdn._gdn_bwd_u_kernel, dict(INVERSE=False, PRECISION="ieee", **blocks))
    build(gdn._gdn_bwd_dx_kernel, dict(PRECISION="tf32", **blocks))
    build(su._x0_kernel, dict(NCOEF=8, BLOCK=1024), dict(eps_ptr="*bf16"))
    build(su._x0_bwd_kernel, dict(NCOEF=8, BLOCK=1024))
    build(su._sampler_update_kernel, dict(NCOEF=8, BLOCK=1024))
    build(ls._sq_partial_kernel, dict(BLOCK=1024))
    build(ls._seed_kernel, dict(SPLIT_P2=2, BLOCK=1024))
''')


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.count("compiled") == 12
