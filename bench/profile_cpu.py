#!/usr/bin/env python3
"""Where the time of one CPU training step goes, and how far it is from the machine's limit.

Builds a config's model as bench/reference.py does (the same libtorch kernels ptb-lm calls:
embedding, per-layer LSTM, linear decoder, cross-entropy, global-norm clip, SGD or AdamW),
times the phases of a step (forward, loss, backward, clip, update) over a number of steps
at each thread count, and prints a Markdown table: milliseconds and share per phase, tokens/s,
the step's floating-point work (the GEMMs: the LSTM's input and recurrent products and the
decoder, forward and backward) in GFLOP/s, and that as a fraction of the CPU's peak FMA
throughput (cores x FMA lanes x 2 x the clock /proc/cpuinfo reports; AVX-512 counts 16 lanes,
AVX2 8, and two FMA units a core are assumed). The clock is the base clock the kernel reports;
a core that boosts higher makes the true fraction lower.

usage: bench/profile_cpu.py [--config configs/rnnlm.toml] [--steps 60] [--threads 1,2]
"""
import argparse
import math
import os
import sys
import time
import tomllib

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from reference import Model, load_split, read_texts, zero_state  # noqa: E402


def peak_gflops(cores):
    """cores x lanes x 2 FMA units x 2 FLOP x GHz, from /proc/cpuinfo (None if unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return None, "unknown CPU"
    flags = next((l for l in info.splitlines() if l.startswith("flags")), "")
    lanes = 16 if " avx512f" in flags else 8 if " fma" in flags else 4
    mhz = [float(l.split(":")[1]) for l in info.splitlines() if l.startswith("cpu MHz")]
    name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "CPU")
    if not mhz:
        return None, name
    ghz = sum(mhz) / len(mhz) / 1000
    return cores * lanes * 2 * 2 * ghz, f"{name}, {ghz:.2f} GHz, {'AVX-512' if lanes == 16 else 'AVX2'}"


def step_flops(m, batch, bptt):
    """FLOPs of one step's matrix products: forward 2mnk each, backward twice that."""
    v, d, h, layers = m["vocab_size"], m["wordvec_size"], m["hidden_size"], m.get("num_layers", 1)
    tokens = batch * bptt
    lstm = sum(2 * 4 * h * ((d if l == 0 else h) + h) for l in range(layers))
    decoder = 2 * h * v
    return 3 * tokens * (lstm + decoder)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(os.path.dirname(HERE), "configs", "rnnlm.toml"))
    ap.add_argument("--data-dir")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", default="1,2")
    a = ap.parse_args()
    with open(a.config, "rb") as f:
        cfg = tomllib.load(f)
    m, t, d = cfg["model"], cfg["train"], cfg.get("data", {})
    tokenizer = d.get("tokenizer", "word")
    train_text = read_texts(d, a.data_dir or d.get("dir", "data/ptb"))[0]
    ids, vocab = load_split(train_text[: 2_000_000], tokenizer)
    m.setdefault("vocab_size", len(vocab) + (tokenizer == "char"))
    B, T = t.get("batch_size", 20), t.get("bptt", 35)
    torch.manual_seed(1)
    model = Model(m)
    model.train()
    if t.get("optimizer", "sgd") == "adam":
        opt = torch.optim.AdamW(model.parameters(), lr=t["lr"])
    else:
        opt = torch.optim.SGD(model.parameters(), lr=t["lr"])
    crit = nn.CrossEntropyLoss()
    data = torch.tensor(ids[: (len(ids) // B) * B]).view(B, -1).t().contiguous()
    flops = step_flops(m, B, T)
    cores = os.cpu_count()
    peak, machine = peak_gflops(cores)
    phases = ["forward", "loss", "backward", "clip", "update"]
    print(f"\n{os.path.basename(a.config)}: batch {B} x bptt {T}, {flops / 1e9:.2f} GFLOP a step (GEMMs); "
          f"{machine}, {cores} cores; peak {peak:.0f} GFLOP/s\n" if peak else f"\n{os.path.basename(a.config)}\n")
    print("| threads | " + " | ".join(f"{p} ms" for p in phases) + " | step ms | tokens/s | GFLOP/s | of peak |")
    print("|---:|" + "---:|" * (len(phases) + 4))
    for n in [int(x) for x in a.threads.split(",")]:
        torch.set_num_threads(n)
        peak_n = peak * n / cores if peak else None
        state = zero_state(model, B, "cpu")
        spent = dict.fromkeys(phases, 0.0)
        warm = 5
        for k in range(a.steps + warm):
            i = (k * T) % (data.size(0) - T - 1)
            xb, yb = data[i : i + T], data[i + 1 : i + 1 + T]
            state = [(h.detach(), c.detach()) for h, c in state]
            t0 = time.perf_counter()
            out, state = model(xb, state)
            t1 = time.perf_counter()
            loss = crit(out.view(-1, out.size(-1)), yb.reshape(-1))
            t2 = time.perf_counter()
            opt.zero_grad()
            loss.backward()
            t3 = time.perf_counter()
            nn.utils.clip_grad_norm_(model.parameters(), t.get("max_grad", 0.25))
            t4 = time.perf_counter()
            opt.step()
            t5 = time.perf_counter()
            if k >= warm:
                for p, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                    spent[p] += dt
        total = sum(spent.values()) / a.steps
        gflops = flops / total / 1e9
        cells = " | ".join(f"{spent[p] / a.steps * 1e3:.1f} ({spent[p] / a.steps / total:.0%})" for p in phases)
        frac = f"{gflops / peak_n:.0%}" if peak_n else "-"
        print(f"| {n} | {cells} | {total * 1e3:.1f} | {B * T / total:,.0f} | {gflops:.1f} | {frac} |")
    print()


if __name__ == "__main__":
    sys.exit(main())
