"""Block-size sweep of the Triton jagged attention kernels on a CUDA GPU (bf16, the issue's GPU shape).

    PYTHONPATH=$PWD python benchmarks/tune_attention_blocks.py

Prints each kernel's time and TFLOP/s (visible pairs only) per (BLOCK_M, BLOCK_N, warps, stages);
put the best into unirec/ops/triton/attention.py:_blocks.
"""
import torch, triton
import unirec
from unirec.ops import jagged_attention
from unirec.ops.triton import attention as ta
torch.manual_seed(0)
B, N, H, D = 128, 1024, 4, 64
lens = torch.randint(256, N + 1, (B,))
off = torch.zeros(B + 1, dtype=torch.long); off[1:] = lens.cumsum(0); off = off.cuda()
T = int(off[-1])
q, k, v, g = (torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
pairs = H * int((lens * (lens + 1) // 2).sum())
out, lse = ta.jagged_attention_fwd_triton(q, k, v, off, N, True, None, "softmax", None, D ** -0.5)
for act in ["softmax", "silu"]:
    out, lse = ta.jagged_attention_fwd_triton(q, k, v, off, N, True, None, act, None, D ** -0.5)
    for cfg in [(64, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 4, 3)]:
        ta.BLOCK_OVERRIDE.clear(); ta.BLOCK_OVERRIDE["fwd"] = cfg
        try:
            t = triton.testing.do_bench(lambda: ta.jagged_attention_fwd_triton(q, k, v, off, N, True, None, act, None, D ** -0.5))
            print(act, "fwd", cfg, "%.3f ms %.1f TFLOP/s" % (t, pairs * 4 * D / t / 1e9), flush=True)
        except Exception as e:
            print(act, "fwd", cfg, "failed", type(e).__name__, str(e)[:100], flush=True)
    for kern, cfgs in [("dkdv", [(32, 128, 4, 3), (64, 64, 4, 2), (64, 128, 8, 2), (32, 64, 4, 3)]),
                       ("dq", [(128, 32, 4, 3), (64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3)])]:
      for cfg in cfgs:
        ta.BLOCK_OVERRIDE.clear(); ta.BLOCK_OVERRIDE[kern] = cfg
        try:
            t = triton.testing.do_bench(lambda: ta.jagged_attention_bwd_triton(g, q, k, v, out, lse, off, N, True, None, act, None, D ** -0.5))
            print(act, "bwd with", kern, cfg, "%.3f ms %.1f TFLOP/s" % (t, pairs * 10 * D / t / 1e9), flush=True)
        except Exception as e:
            print(act, "bwd with", kern, cfg, "failed", type(e).__name__, str(e)[:100], flush=True)
ta.BLOCK_OVERRIDE.clear()
