#!/usr/bin/env python3
"""Loads a ptb-lm checkpoint into plain PyTorch modules and scores a text file with them.

    python bench/load_checkpoint.py CKPT_DIR TEXT_FILE [--allow-unk]

Builds nn.Embedding, one multi-layer nn.LSTM / nn.GRU / nn.RNN (tanh or ReLU, as the
checkpoint's `model.cell` says; an older checkpoint without the key is an LSTM) and
nn.Linear from CKPT_DIR/model.safetensors, mapping ptb-lm's names onto PyTorch's one to one:
`{lstm,gru,rnn}.{l}.weight_ih` -> `weight_ih_l{l}` (and weight_hh, bias_ih, bias_hh),
`embedding.weight`, `decoder.weight` (the embedding when tied) and `decoder.bias`. Every tensor
of the file must be used and every module weight filled, with its shape.

Scores TEXT_FILE as `ptb-lm eval --checkpoint CKPT_DIR --file TEXT_FILE` does: the text read
as the checkpoint's corpus reads it (UTF-8 without a byte-order mark, lower-cased when
`data.lowercase`), `<eos>` after each line, one `<eos>` prepended, every token after it
predicted, in one stream from a zero state, no dropout; prints the perplexity (exp of the mean
loss per token) on stdout.

Reads safetensors with the `safetensors` package when installed, else by hand (8-byte
little-endian header length, JSON header, raw little-endian data). Needs only torch.
"""
import argparse
import json
import math
import os
import struct
import sys

import torch
import torch.nn as nn

DTYPES = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16}
CELLS = {
    "lstm": ("lstm", lambda d, h, n: nn.LSTM(d, h, n)),
    "gru": ("gru", lambda d, h, n: nn.GRU(d, h, n)),
    "rnn_tanh": ("rnn", lambda d, h, n: nn.RNN(d, h, n, nonlinearity="tanh")),
    "rnn_relu": ("rnn", lambda d, h, n: nn.RNN(d, h, n, nonlinearity="relu")),
}


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def read_safetensors(path):
    try:
        from safetensors.torch import load_file
    except ImportError:
        pass
    else:
        return load_file(path)
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        fail(f"{path}: not a safetensors file (shorter than its header length)")
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            fail(f"{path}: tensor {name} has dtype {info['dtype']}, which this script does not read")
        start, end = info["data_offsets"]
        raw = bytearray(data[base + start : base + end])
        t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(info["shape"]).clone()
    return out


def build(meta, tensors):
    m = meta["config"]["model"]
    cell = m.get("cell", "lstm")
    if cell not in CELLS:
        fail(f"checkpoint.json: model.cell '{cell}' is not one of {', '.join(CELLS)}")
    prefix, make = CELLS[cell]
    v, d, h, n = len(meta["vocab"]), m["wordvec_size"], m["hidden_size"], m.get("num_layers", 1)
    embedding = nn.Embedding(v, d)
    rnn = make(d, h, n)
    decoder = nn.Linear(h, v)
    used = set()

    def take(name, param):
        if name not in tensors:
            fail(f"model.safetensors: tensor {name} is missing")
        t = tensors[name]
        if tuple(t.shape) != tuple(param.shape):
            fail(f"model.safetensors: {name} has shape {tuple(t.shape)}, PyTorch's module expects {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(t.to(param.dtype))
        used.add(name)

    take("embedding.weight", embedding.weight)
    for l in range(n):
        for part in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            take(f"{prefix}.{l}.{part}", getattr(rnn, f"{part}_l{l}"))
    take("embedding.weight" if m.get("tie_weights", False) else "decoder.weight", decoder.weight)
    take("decoder.bias", decoder.bias)
    extra = sorted(set(tensors) - used)
    if extra:
        fail(f"model.safetensors: tensors no PyTorch module takes: {', '.join(extra)}")
    return cell, embedding, rnn, decoder


def read_ids(path, meta, allow_unk):
    with open(path, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8")
    if text.startswith("\ufeff"):
        text = text[1:]
    if meta["config"].get("data", {}).get("lowercase", False):
        text = text.lower()
    vocab = {w: i for i, w in enumerate(meta["vocab"])}
    eos = vocab["<eos>"]
    ids = [eos]
    # As Rust's str::lines: split at \n, one trailing \r dropped, no empty last line.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for k, line in enumerate(lines):
        if line.endswith("\r"):
            line = line[:-1]
        for w in line.split():
            if w in vocab:
                ids.append(vocab[w])
            elif allow_unk and "<unk>" in vocab:
                ids.append(vocab["<unk>"])
            else:
                fail(f"{path} line {k + 1}: word '{w}' is not in the training vocabulary")
        ids.append(eos)
    return ids


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("text")
    ap.add_argument("--allow-unk", action="store_true")
    args = ap.parse_args()
    with open(os.path.join(args.checkpoint, "checkpoint.json")) as f:
        meta = json.load(f)
    tensors = read_safetensors(os.path.join(args.checkpoint, "model.safetensors"))
    cell, embedding, rnn, decoder = build(meta, tensors)
    ids = read_ids(args.text, meta, args.allow_unk)
    if len(ids) < 2:
        fail(f"{args.text}: no words to score")
    torch.set_num_threads(1)
    with torch.no_grad():
        x = torch.tensor(ids[:-1]).view(-1, 1)
        y = torch.tensor(ids[1:])
        out, _ = rnn(embedding(x))  # zero initial state
        logits = decoder(out).view(len(ids) - 1, -1)
        nll = -torch.log_softmax(logits.double(), dim=-1).gather(1, y.view(-1, 1)).sum().item()
    ppl = math.exp(nll / (len(ids) - 1))
    print(f"{cell} perplexity: {ppl:.10g} ({len(ids) - 1} tokens)")


if __name__ == "__main__":
    main()
