#!/usr/bin/env python3
"""What bounds the training step on a GPU: times one CUDA-graphed SGD step of the
better.toml model (2x650 LSTM, tied, dropout 0.5, batch 20, bptt 35) under several variants,
and profiles the kernels of the baseline. Used to choose ptb-lm's speed levers (issue 6).

Variants: per-layer cuDNN LSTM calls (ptb-lm's layout) in FP32; + TF32 matmuls; one 2-layer
cuDNN call (dropout inside cuDNN); + bf16 autocast. Prints ms/step and tokens/s.
"""
import math
import sys
import time

import torch
import torch.nn as nn

V, D, H, L, B, T, P = 10000, 650, 650, 2, 20, 35, 0.5


class StepLSTM(nn.Module):
    """One layer as explicit time steps: all input projections in one GEMM, then per step a
    GEMM with W_hh and libtorch's fused LSTM cell."""

    def __init__(self, i, h):
        super().__init__()
        self.w_ih = nn.Parameter(torch.randn(4 * h, i) / math.sqrt(i))
        self.w_hh = nn.Parameter(torch.randn(4 * h, h) / math.sqrt(h))
        self.b = nn.Parameter(torch.zeros(4 * h))

    def forward(self, x, hc):
        h, c = hc[0][0], hc[1][0]
        xw = torch.nn.functional.linear(x, self.w_ih, self.b)
        outs = []
        for t in range(x.size(0)):
            hg = torch.mm(h, self.w_hh.t())
            h, c, _ = torch.ops.aten._thnn_fused_lstm_cell(xw[t], hg, c)
            outs.append(h)
        return torch.stack(outs), (h[None], c[None])


class Net(nn.Module):
    def __init__(self, fused, manual=False):
        super().__init__()
        self.fused = fused
        self.embed = nn.Embedding(V, D)
        self.drop = nn.Dropout(P)
        if fused:
            self.lstm = nn.LSTM(D, H, num_layers=L, dropout=P)
        elif manual:
            self.lstms = nn.ModuleList(StepLSTM(D if i == 0 else H, H) for i in range(L))
        else:
            self.lstms = nn.ModuleList(nn.LSTM(D if i == 0 else H, H) for i in range(L))
        self.dec = nn.Linear(H, V)
        self.dec.weight = self.embed.weight

    def forward(self, x, h, c):
        e = self.drop(self.embed(x))
        if self.fused:
            out, (hn, cn) = self.lstm(e, (h, c))
        else:
            hs, cs, out = [], [], e
            for i, l in enumerate(self.lstms):
                out, (a, b) = l(out, (h[i : i + 1], c[i : i + 1]))
                hs.append(a)
                cs.append(b)
                if i + 1 < L:
                    out = self.drop(out)
            hn, cn = torch.cat(hs), torch.cat(cs)
        return self.dec(self.drop(out)), hn, cn


def make_step(net, bf16):
    params = list(net.parameters())
    lr = torch.tensor(1.0, device="cuda")
    x = torch.randint(V, (T, B), device="cuda")
    y = torch.randint(V, (T, B), device="cuda")
    h = torch.zeros(L, B, H, device="cuda")
    c = torch.zeros(L, B, H, device="cuda")
    loss_sum = torch.zeros((), device="cuda", dtype=torch.float64)

    def step():
        for p in params:
            if p.grad is not None:
                p.grad.zero_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out, hn, cn = net(x, h, c)
            loss = nn.functional.cross_entropy(out.view(-1, V).float(), y.view(-1))
        loss.backward()
        with torch.no_grad():
            norm = torch.stack([p.grad.norm() for p in params]).norm()
            s = (0.25 / (norm + 1e-6)).clamp(max=1.0) * lr
            for p in params:
                p.sub_(p.grad * s)
            h.copy_(hn)
            c.copy_(cn)
            loss_sum.add_(loss.detach().double())

    return step


def time_variant(name, fused, tf32, bf16, steps=300, manual=False):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.manual_seed(0)
    net = Net(fused, manual).cuda()
    step = make_step(net, bf16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    for _ in range(10):
        g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        g.replay()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / steps * 1000
    print(f"{name:42s} {ms:7.3f} ms/step {B * T / ms * 1000:10,.0f} tokens/s", flush=True)
    return g


def main():
    print(torch.cuda.get_device_name(0), torch.__version__, "cudnn", torch.backends.cudnn.version())
    g = time_variant("per-layer LSTM, fp32 (ptb-lm now)", False, False, False)
    time_variant("per-layer LSTM, tf32 matmul", False, True, False)
    time_variant("2-layer cuDNN call, tf32 matmul", True, True, False)
    time_variant("per-layer LSTM, bf16 autocast", False, True, True)
    time_variant("2-layer cuDNN call, bf16 autocast", True, True, True)
    time_variant("per-step LSTM (GEMM + fused cell), fp32", False, False, False, manual=True)
    time_variant("per-step LSTM (GEMM + fused cell), tf32", False, True, False, manual=True)
    time_variant("per-step LSTM, bf16 autocast", False, True, True, manual=True)
    if "--profile" in sys.argv:
        torch.backends.cuda.matmul.allow_tf32 = False
        g = time_variant("profiled: per-layer, fp32", False, False, False, steps=20)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                g.replay()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))


if __name__ == "__main__":
    main()
