#!/usr/bin/env python3
"""The recipe of a ptb-lm config in plain PyTorch eager, as a reference for bench/bench.py.

Same data handling (vocabulary by first appearance, <eos> per line, the book's offset
batching), same model (embedding -> dropout -> LSTM layers with dropout between -> dropout ->
tied decoder; the book's initialisation), same SGD + global-norm clipping and lr/4 rule.
Written the way a plain PyTorch training loop is usually written (cuDNN LSTM, loss.item()
each step, clip_grad_norm_, torch.optim.SGD).

Prints one JSON object per epoch on stdout, then a summary object.
"""
import argparse
import json
import math
import os
import resource
import sys
import time
import tomllib

import torch
import torch.nn as nn


def load_split(path, vocab=None):
    words = []
    with open(path) as f:
        for line in f:
            words.extend(line.split())
            words.append("<eos>")
    if vocab is None:
        vocab = {}
        for w in words:
            vocab.setdefault(w, len(vocab))
    return [vocab[w] for w in words], vocab


def streams(ids, batch, bptt, device):
    n = len(ids) - 1
    jump = n // batch
    t = torch.tensor(ids, dtype=torch.long)
    x = t[: batch * jump].view(batch, jump).t().contiguous().to(device)
    y = t[1 : 1 + batch * jump].view(batch, jump).t().contiguous().to(device)
    return x, y, jump // bptt


class Model(nn.Module):
    def __init__(self, m):
        super().__init__()
        v, d, h, layers = m["vocab_size"], m["wordvec_size"], m["hidden_size"], m.get("num_layers", 1)
        p = m.get("dropout", 0.0)
        self.drop = nn.Dropout(p)
        self.embed = nn.Embedding(v, d)
        self.lstms = nn.ModuleList(nn.LSTM(d if i == 0 else h, h) for i in range(layers))
        self.decoder = nn.Linear(h, v)
        nn.init.normal_(self.embed.weight, 0, 0.01)
        for lstm in self.lstms:
            nn.init.normal_(lstm.weight_ih_l0, 0, 1 / math.sqrt(lstm.input_size))
            nn.init.normal_(lstm.weight_hh_l0, 0, 1 / math.sqrt(h))
            nn.init.zeros_(lstm.bias_ih_l0)
            nn.init.zeros_(lstm.bias_hh_l0)
        nn.init.normal_(self.decoder.weight, 0, 1 / math.sqrt(h))
        nn.init.zeros_(self.decoder.bias)
        if m.get("tie_weights", False):
            self.decoder.weight = self.embed.weight

    def forward(self, x, state):
        h = self.drop(self.embed(x))
        new = []
        for lstm, s in zip(self.lstms, state):
            h, s = lstm(h, s)
            new.append(s)
            h = self.drop(h)
        return self.decoder(h), new


def zero_state(model, batch, device):
    return [
        (torch.zeros(1, batch, l.hidden_size, device=device), torch.zeros(1, batch, l.hidden_size, device=device))
        for l in model.lstms
    ]


def evaluate(model, x, y, nb, bptt, batch, device, crit):
    model.eval()
    state = zero_state(model, batch, device)
    total = torch.zeros((), device=device, dtype=torch.float64)
    with torch.no_grad():
        for k in range(nb):
            xb, yb = x[k * bptt : (k + 1) * bptt], y[k * bptt : (k + 1) * bptt]
            out, state = model(xb, state)
            total += crit(out.view(-1, out.size(-1)), yb.reshape(-1)).double()
    model.train()
    return math.exp(total.item() / nb)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--data-dir")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--test", action="store_true", help="also report test perplexity at the end")
    a = ap.parse_args()
    with open(a.config, "rb") as f:
        cfg = tomllib.load(f)
    m, t, d = cfg["model"], cfg["train"], cfg.get("data", {})
    data_dir = a.data_dir or d.get("dir", "data/ptb")
    epochs = a.epochs or t["epochs"]
    device = torch.device("cuda" if (a.device == "auto" and torch.cuda.is_available()) or a.device == "cuda" else "cpu")
    torch.manual_seed(t.get("seed", 1))
    train_ids, vocab = load_split(os.path.join(data_dir, "ptb.train.txt"))
    valid_ids, _ = load_split(os.path.join(data_dir, "ptb.valid.txt"), vocab)
    test_ids, _ = load_split(os.path.join(data_dir, "ptb.test.txt"), vocab)
    cap = lambda ids, key: ids[: d[key]] if d.get(key) else ids
    train_ids, valid_ids, test_ids = cap(train_ids, "train_tokens"), cap(valid_ids, "valid_tokens"), cap(test_ids, "test_tokens")
    B, T, EB = t.get("batch_size", 20), t.get("bptt", 35), t.get("eval_batch_size", 10)
    tx, ty, tnb = streams(train_ids, B, T, device)
    vx, vy, vnb = streams(valid_ids, EB, T, device)
    model = Model(m).to(device)
    crit = nn.CrossEntropyLoss()
    lr, best = t["lr"], float("inf")
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    max_grad = t.get("max_grad", 0.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for epoch in range(1, epochs + 1):
        state = zero_state(model, B, device)
        total, t0 = 0.0, time.perf_counter()
        for k in range(tnb):
            xb, yb = tx[k * T : (k + 1) * T], ty[k * T : (k + 1) * T]
            state = [(h.detach(), c.detach()) for h, c in state]
            out, state = model(xb, state)
            loss = crit(out.view(-1, out.size(-1)), yb.reshape(-1))
            opt.zero_grad()
            loss.backward()
            if max_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), max_grad)
            opt.step()
            total += loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        v0 = time.perf_counter()
        valid = evaluate(model, vx, vy, vnb, T, EB, device, crit)
        vsecs = time.perf_counter() - v0
        record = {
            "epoch": epoch,
            "lr": lr,
            "train_ppl": math.exp(total / tnb),
            "valid_ppl": valid,
            "tokens_per_s": tnb * B * T / secs,
            "seconds": secs,
            "valid_seconds": vsecs,
            "valid_tokens": vnb * EB * T,
            "device": str(device),
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        print(json.dumps(record), flush=True)
        if valid < best:
            best = valid
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            lr /= t.get("lr_decay", 4.0)
            for g in opt.param_groups:
                g["lr"] = lr
    summary = {"best_valid_ppl": best}
    if a.test:
        model.load_state_dict(best_state)
        ex, ey, enb = streams(test_ids, EB, T, device)
        summary["test_ppl"] = evaluate(model, ex, ey, enb, T, EB, device, crit)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    sys.exit(main())
