"""Single-thread CPU time (time.thread_time) of jagged attention fwd and bwd on the issue's CPU shapes,
and of padded SDPA fwd+bwd with `sdpa` as argument: a reading that shared, busy cores disturb less than
wall-clock medians.

    PYTHONPATH=$PWD python benchmarks/attention_cpu_time.py sdpa
"""
import torch, time, unirec, sys
import torch.nn.functional as F
from unirec.ops.reference.attention import pad_jagged, jagged_attention_mask
torch.set_num_threads(1)
def tm(fn, n=3):
    fn(); ts=[]
    for _ in range(n):
        t=time.thread_time(); fn(); ts.append(time.thread_time()-t)
    return sorted(ts)[n//2]*1e3
g0=torch.Generator().manual_seed(0)
for (B,N,lo,H,D) in [(64,200,20,2,32),(16,1024,256,4,64)]:
    lens=torch.randint(lo,N+1,(B,),generator=g0); off=torch.zeros(B+1,dtype=torch.long); off[1:]=lens.cumsum(0); T=int(off[-1])
    q,k,v,g=(torch.randn(T,H,D) for _ in range(4))
    pairs = H*int((lens*(lens+1)//2).sum())
    res=[]
    for act in ["softmax","silu"]:
        out,lse = torch.ops.unirec.jagged_attention_fwd(q,k,v,off,N,True,None,act,None,D**-0.5)
        f=tm(lambda: torch.ops.unirec.jagged_attention_fwd(q,k,v,off,N,True,None,act,None,D**-0.5))
        b=tm(lambda: torch.ops.unirec.jagged_attention_bwd(g,q,k,v,out,lse,off,N,True,None,act,None,D**-0.5))
        res.append("%s fwd %.1f bwd %.1f ms (%.0f GF/s)"%(act,f,b,pairs*14*D/(f+b)/1e6))
    if len(sys.argv)>1:
        qp,kp,vp=(pad_jagged(t,off,N).transpose(1,2).contiguous().requires_grad_() for t in (q,k,v)); gp=pad_jagged(g,off,N).transpose(1,2).contiguous()
        mask=jagged_attention_mask(off,N)[:,None]
        s=tm(lambda: torch.autograd.grad(F.scaled_dot_product_attention(qp,kp,vp,attn_mask=mask),(qp,kp,vp),gp))
        res.append("sdpa %.1f"%s)
    print(B,N,H,D, " | ".join(res))
