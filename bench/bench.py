#!/usr/bin/env python3
"""Side-by-side speed of ptb-lm and plain PyTorch (bench/reference.py) on one machine.

Runs the same config for a few epochs with ptb-lm (CUDA graph and plain paths on a GPU) and
with the PyTorch reference, then prints a Markdown table: train tokens/s, seconds per epoch,
eval tokens/s, peak GPU memory (allocator), peak RSS, validation perplexity, and the ratio
to PyTorch. The first epoch of every run includes warm-up; the table reports the last one.

usage: bench/bench.py [--config FILE ...] [--epochs N] [--bin target/release/ptb-lm]
       bench/bench.py --ranks [--config configs/rnnlm.toml]   (1 process vs 2 Gloo ranks, CPU)
Default configs: configs/better.toml (every speed path) and configs/best.toml (the
regularised recipe: as configured and without the CUDA graph, against the same recipe in
PyTorch) on a GPU, 2 epochs; configs/rnnlm.toml (words: the 100x10,000 decoder is the
cost) and configs/shakespeare-char.toml (characters: the LSTM is) on a CPU, 1 epoch. One
table per config.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_ptb_lm(binary, config, epochs, device, data_dir, settings, out):
    args = [binary, "train", "--config", config, "--epochs", str(epochs), "--out-dir", out,
            "--overwrite", "--quiet", "--device", device]
    for s in settings:
        args += ["--set", s]
    if data_dir:
        args += ["--data-dir", data_dir]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f if l.strip()]


def run_reference(config, epochs, device, data_dir):
    args = [sys.executable, os.path.join(HERE, "reference.py"), "--config", config, "--epochs", str(epochs),
            "--device", device]
    if data_dir:
        args += ["--data-dir", data_dir]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return [r for r in map(json.loads, out.splitlines()) if "epoch" in r]


def valid_tokens(config, data_dir):
    """The validation tokens both programs score: the split's tokens (words or characters,
    and a line end each), capped at data.valid_tokens, in whole batches of bptt steps."""
    import tomllib
    sys.path.insert(0, HERE)
    from reference import read_texts, tokens
    with open(config, "rb") as f:
        cfg = tomllib.load(f)
    d = cfg.get("data", {})
    text = read_texts(d, data_dir or d.get("dir", "data/ptb"))[1]
    n = len(tokens(text, d.get("tokenizer", "word")))
    cap = d.get("valid_tokens")
    n = min(n, cap) if cap else n
    t = cfg["train"]
    eb, bptt = t.get("eval_batch_size", 10), t.get("bptt", 35)
    return ((n - 1) // (eb * bptt)) * eb * bptt


def bench(a, config, cuda, device, machine):
    import tomllib
    with open(config, "rb") as f:
        m = tomllib.load(f)["model"]
    regularised = m.get("locked_dropout") or m.get("weight_drop", 0) > 0
    vt = valid_tokens(config, a.data_dir)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = ["train.precision=fp32", "train.fused_lstm=false"]
        if not cuda:
            variants = [("ptb-lm", [])]
        elif regularised:
            variants = [("ptb-lm: as configured", []), ("ptb-lm: without the CUDA graph", ["train.cuda_graph=false"])]
        else:
            variants = [
                ("ptb-lm: graph, bf16, fused layers", ["train.precision=bf16", "train.fused_lstm=true"]),
                ("ptb-lm: graph, tf32, fused layers", ["train.precision=tf32", "train.fused_lstm=true"]),
                ("ptb-lm: graph, fp32", fp32),
                ("ptb-lm: plain, fp32", fp32 + ["train.cuda_graph=false"]),
            ]
        for i, (name, settings) in enumerate(variants):
            recs = run_ptb_lm(a.bin, config, a.epochs, device, a.data_dir, settings, os.path.join(tmp, f"run{i}"))
            rows.append((name, recs[-1], recs))
    ref = run_reference(config, a.epochs, device, a.data_dir)
    rows.append(("PyTorch eager", ref[-1], ref))
    base = ref[-1]["tokens_per_s"]
    print(f"\n{os.path.relpath(config, ROOT)}, {a.epochs} epochs, on {machine} (last epoch shown)\n")
    print("| run | train tokens/s | s/epoch | eval tokens/s | peak GPU MiB | peak RSS MiB | valid ppl | speed vs PyTorch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r, recs in rows:
        gpu = f"{r['peak_gpu_mib']:.0f}" if r.get("peak_gpu_mib") else "-"
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['seconds']:.2f} | {vt / r['valid_seconds']:,.0f} | {gpu} | "
              f"{r['peak_rss_mib']:.0f} | {r['valid_ppl']:.2f} | {r['tokens_per_s'] / base:.2f}x |")
    print()
    print(json.dumps({"config": config, "machine": machine, "epochs": a.epochs,
                      "runs": {name: recs for name, _, recs in rows}}))


def bench_ranks(a):
    """One process (all cores, and one thread) against two Gloo ranks of one thread each, on
    the CPU: train tokens/s of one epoch of a 200,000-token slice."""
    config = (a.config or [os.path.join(ROOT, "configs", "rnnlm.toml")])[0]
    runs = [("1 process, all cores", [], []), ("1 process, 1 thread", ["--threads", "1"], []),
            ("2 Gloo ranks, 1 thread each", ["--threads", "1"], ["--nproc", "2"])]
    print(f"\n{os.path.relpath(config, ROOT)}, 200,000 training tokens, 1 epoch, CPU, {os.cpu_count()} cores\n")
    print("| run | train tokens/s | s/epoch | valid ppl |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, pre, post) in enumerate(runs):
            out = os.path.join(tmp, f"r{i}")
            args = [a.bin] + pre + ["train", "--config", config, "--epochs", "1", "--out-dir", out, "--device", "cpu",
                                    "--set", "data.train_tokens=200000", "--quiet"] + post
            if a.data_dir:
                args += ["--data-dir", a.data_dir]
            subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
            with open(os.path.join(out, "metrics.jsonl")) as f:
                r = json.loads(f.readline())
            print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['seconds']:.1f} | {r['valid_ppl']:.2f} |")


def cpu_name():
    """The processor's model name, as /proc/cpuinfo gives it ("CPU" where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return "CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", action="store_true", help="1 process vs 2 Gloo ranks on the CPU")
    ap.add_argument("--config", action="append")
    ap.add_argument("--epochs", type=int, help="epochs per run (2 on a GPU, 1 on the CPU)")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "ptb-lm"))
    ap.add_argument("--data-dir")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    if a.ranks:
        return bench_ranks(a)
    import torch
    cuda = torch.cuda.is_available() and a.device != "cpu"
    device = "cuda" if cuda else "cpu"
    defaults = ["better.toml", "best.toml"] if cuda else ["rnnlm.toml", "shakespeare-char.toml"]
    a.epochs = a.epochs or (2 if cuda else 1)
    configs = a.config or [os.path.join(ROOT, "configs", c) for c in defaults]
    machine = torch.cuda.get_device_name(0) if cuda else f"{cpu_name()}, {os.cpu_count()} cores"
    for config in configs:
        bench(a, config, cuda, device, machine)


if __name__ == "__main__":
    main()
