#!/usr/bin/env python3
"""The recipe of a ptb-lm config in plain PyTorch eager, as a reference for bench/bench.py.

Same data handling (vocabulary by first appearance, <eos> per line, the book's offset
batching), same model (embedding -> dropout -> LSTM layers with dropout between -> dropout ->
tied decoder; the book's or PyTorch's initialisation), same SGD + global-norm clipping and
lr/4 rule (or AdamW with a warm-up and cosine, and characters as tokens, for the character
configs). Written the way a plain PyTorch training loop is usually written (cuDNN LSTM,
loss.item() each step, clip_grad_norm_, torch.optim.SGD).

The regularised recipe of configs/best.toml is followed too, the way AWD-LSTM's code
(salesforce/awd-lstm-lm) writes it, so the comparison is like for like: locked
(variational) dropout, embedding dropout, weight drop on the hidden-to-hidden weights
(DropConnect, one mask per batch, through the functional LSTM), AR and TAR on the last
layer's output, weight decay, and NT-ASGD (torch.optim.ASGD with t0=0, lambd=0 once
validation stops improving, as AWD-LSTM's main.py switches).

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


def tokens(text, tokenizer):
    """The tokens of a text as ptb-lm's word and char tokenizers read it: a line's words (or
    every character of it, the space too), then <eos> for its end."""
    out = []
    for line in text.splitlines():
        out.extend(line.split() if tokenizer == "word" else line)
        out.append("<eos>")
    return out


def load_split(text, tokenizer, vocab=None):
    toks = tokens(text, tokenizer)
    if vocab is None:
        vocab = {}
        for w in toks:
            vocab.setdefault(w, len(vocab))
    unk = vocab.get("<unk>", 0)
    return [vocab.get(w, unk) for w in toks], vocab


def read_texts(d, data_dir):
    """Train, valid and test text: `ptb.{split}.txt` in the data directory, or `data.file`
    cut at `data.split`'s character fractions (nanoGPT's cut; no test text with two parts)."""
    if d.get("file"):
        with open(d["file"]) as f:
            text = f.read()
        cuts, at = [], 0
        for frac in d["split"]:
            cuts.append(text[at : at + int(len(text) * frac)])
            at += len(cuts[-1])
        return cuts + [""] * (3 - len(cuts))
    texts = []
    for split in ("train", "valid", "test"):
        with open(os.path.join(data_dir, f"ptb.{split}.txt")) as f:
            texts.append(f.read())
    return texts


def lr_at(t, step, steps):
    """The config's lr at a step: constant (the plateau rule acts per epoch), or warm-up then
    cosine down to train.min_lr over the run's steps (ptb-lm spans it over its time budget)."""
    lr = t["lr"]
    if t.get("schedule", "plateau") != "cosine":
        return lr
    warm = t.get("warmup_steps", 0)
    if step < warm:
        return lr * (step + 1) / warm
    low = t.get("min_lr", 0.0)
    frac = min(1.0, (step - warm) / max(1, steps - warm))
    return low + (lr - low) * 0.5 * (1 + math.cos(math.pi * frac))


def streams(ids, batch, bptt, device):
    n = len(ids) - 1
    jump = n // batch
    t = torch.tensor(ids, dtype=torch.long)
    x = t[: batch * jump].view(batch, jump).t().contiguous().to(device)
    y = t[1 : 1 + batch * jump].view(batch, jump).t().contiguous().to(device)
    return x, y, jump // bptt


def locked_dropout(x, p, training):
    """One mask per sequence, shared by every time step (Gal & Ghahramani 2016)."""
    if not training or p == 0:
        return x
    mask = x.new_empty(1, x.size(1), x.size(2)).bernoulli_(1 - p) / (1 - p)
    return x * mask


def embedding_dropout(weight, p, training):
    """Drops whole words (rows of the embedding matrix)."""
    if not training or p == 0:
        return weight
    mask = weight.new_empty(weight.size(0), 1).bernoulli_(1 - p) / (1 - p)
    return weight * mask


class Model(nn.Module):
    def __init__(self, m):
        super().__init__()
        v, d, h, layers = m["vocab_size"], m["wordvec_size"], m["hidden_size"], m.get("num_layers", 1)
        p = m.get("dropout", 0.0)
        self.p_in, self.p_hid, self.p_out = (m.get(k, p) for k in ("dropout_input", "dropout_hidden", "dropout_output"))
        self.locked = m.get("locked_dropout", False)
        self.p_emb = m.get("dropout_embedding", 0.0)
        self.wdrop = m.get("weight_drop", 0.0)
        self.embed = nn.Embedding(v, d)
        self.lstms = nn.ModuleList(nn.LSTM(d if i == 0 else h, h) for i in range(layers))
        self.decoder = nn.Linear(h, v)
        if m.get("init", "book") == "book":
            nn.init.normal_(self.embed.weight, 0, 0.01)
            for lstm in self.lstms:
                nn.init.normal_(lstm.weight_ih_l0, 0, 1 / math.sqrt(lstm.input_size))
                nn.init.normal_(lstm.weight_hh_l0, 0, 1 / math.sqrt(h))
                nn.init.zeros_(lstm.bias_ih_l0)
                nn.init.zeros_(lstm.bias_hh_l0)
            nn.init.normal_(self.decoder.weight, 0, 1 / math.sqrt(h))
        else:  # "uniform": nn.LSTM's own init, embedding and decoder U(-0.1, 0.1)
            nn.init.uniform_(self.embed.weight, -0.1, 0.1)
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if m.get("tie_weights", False):
            self.decoder.weight = self.embed.weight

    def drop(self, x, p):
        if self.locked:
            return locked_dropout(x, p, self.training)
        return nn.functional.dropout(x, p, self.training)

    def run_lstm(self, lstm, x, s):
        if not (self.training and self.wdrop > 0):
            return lstm(x, s)
        # DropConnect on W_hh: the functional LSTM with a dropped copy of the weight.
        w_hh = nn.functional.dropout(lstm.weight_hh_l0, self.wdrop, True)
        weights = [lstm.weight_ih_l0, w_hh, lstm.bias_ih_l0, lstm.bias_hh_l0]
        out, h, c = torch._VF.lstm(x, s, weights, True, 1, 0.0, True, False, False)
        return out, (h, c)

    def forward(self, x, state):
        w = embedding_dropout(self.embed.weight, self.p_emb, self.training)
        h = self.drop(nn.functional.embedding(x, w), self.p_in)
        new = []
        for i, (lstm, s) in enumerate(zip(self.lstms, state)):
            h, s = self.run_lstm(lstm, h, s)
            new.append(s)
            last = i + 1 == len(self.lstms)
            raw = h
            h = self.drop(h, self.p_out if last else self.p_hid)
        self.last_raw, self.last_dropped = raw, h
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
    tokenizer = d.get("tokenizer", "word")
    if tokenizer not in ("word", "char"):
        sys.exit(f"{a.config}: data.tokenizer = {tokenizer!r} has no reference here; use word or char")
    train_text, valid_text, test_text = read_texts(d, data_dir)
    train_ids, vocab = load_split(train_text, tokenizer)
    if tokenizer == "char":
        vocab.setdefault("<unk>", len(vocab))
    m.setdefault("vocab_size", len(vocab))
    valid_ids, _ = load_split(valid_text, tokenizer, vocab)
    test_ids, _ = load_split(test_text, tokenizer, vocab)
    cap = lambda ids, key: ids[: d[key]] if d.get(key) else ids
    train_ids, valid_ids, test_ids = cap(train_ids, "train_tokens"), cap(valid_ids, "valid_tokens"), cap(test_ids, "test_tokens")
    B, T, EB = t.get("batch_size", 20), t.get("bptt", 35), t.get("eval_batch_size", 10)
    tx, ty, tnb = streams(train_ids, B, T, device)
    vx, vy, vnb = streams(valid_ids, EB, T, device)
    model = Model(m).to(device)
    crit = nn.CrossEntropyLoss()
    lr, best = t["lr"], float("inf")
    wdecay = t.get("weight_decay", 0.0)
    adam = t.get("optimizer", "sgd") == "adam"
    if adam:  # AdamW: decoupled weight decay (Loshchilov & Hutter 2019), as ptb-lm's adam
        betas = (t.get("adam_beta1", 0.9), t.get("adam_beta2", 0.999))
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=t.get("adam_eps", 1e-8), weight_decay=wdecay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wdecay)
    step, steps = 0, epochs * tnb
    max_grad = t.get("max_grad", 0.0)
    alpha, beta = t.get("ar_alpha", 0.0), t.get("tar_beta", 0.0)
    asgd, nonmono, history = t.get("asgd", False), t.get("asgd_nonmono", 5), []
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
            total_loss = loss
            if alpha > 0:
                total_loss = total_loss + alpha * model.last_dropped.pow(2).mean()
            if beta > 0:
                raw = model.last_raw
                total_loss = total_loss + beta * (raw[1:] - raw[:-1]).pow(2).mean()
            if t.get("schedule", "plateau") == "cosine":
                lr = lr_at(t, step, steps)
                for g in opt.param_groups:
                    g["lr"] = lr
            step += 1
            opt.zero_grad()
            total_loss.backward()
            if max_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), max_grad)
            opt.step()
            total += loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        v0 = time.perf_counter()
        averaging = isinstance(opt, torch.optim.ASGD)
        if averaging:  # validate the averaged weights, as AWD-LSTM's main.py does
            saved = {p: p.data.clone() for p in model.parameters()}
            for p in model.parameters():
                p.data.copy_(opt.state[p]["ax"])
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
        record["averaging"] = averaging
        print(json.dumps(record), flush=True)
        improved = valid < best
        if improved:
            best = valid
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        if averaging:
            for p in model.parameters():
                p.data.copy_(saved[p])
        start_asgd = asgd and not averaging and len(history) > nonmono and valid > min(history[:-nonmono])
        history.append(valid)
        if start_asgd:
            opt = torch.optim.ASGD(model.parameters(), lr=lr, t0=0, lambd=0.0, weight_decay=wdecay)
        elif not improved and not averaging and t.get("schedule", "plateau") == "plateau":
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
