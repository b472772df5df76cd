#!/usr/bin/env python3
"""The book's comparison of recurrent cells, measured: one ptb-lm run per cell and size.

Trains each cell (lstm, gru, rnn_tanh, rnn_relu) at the book's Rnnlm size (configs/rnnlm.toml:
1 layer of 100 units, 4 epochs, SGD lr 20, clipping 0.25) and as a 2-layer model (2×100 as
rnnlm.toml otherwise, or 2×200 tied with dropout 0.2), each with the same seed, and prints a Markdown table: test
perplexity and bits per character, parameters, train tokens/s (last epoch), and whether the
run trained at all. A run the divergence guard stops is reported as such, with its message.
`--lr CELL=LR` adds a row for CELL at another learning rate (e.g. --lr rnn_tanh=1).

usage: bench/cells.py [--bin target/release/ptb-lm] [--out runs/cells] [--epochs 4]
                      [--sizes rnnlm,2x100,2x200] [--cells lstm,gru,rnn_tanh,rnn_relu]
                      [--threads N] [--jobs N] [--lr CELL=LR ...]
"""
import argparse
import concurrent.futures
import json
import os
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SIZES = {
    "rnnlm": [],
    "2x100": ["model.num_layers=2"],
    "2x200": ["model.num_layers=2", "model.wordvec_size=200", "model.hidden_size=200", "model.dropout=0.2",
              "model.tie_weights=true"],
}


def run(args, size, cell, lr):
    name = f"{size}-{cell}" + (f"-lr{lr:g}" if lr is not None else "")
    out = os.path.join(args.out, name)
    cmd = [args.bin, "train", "--config", os.path.join(ROOT, "configs/rnnlm.toml"), "--out-dir", out,
           "--overwrite", "--quiet", "--epochs", str(args.epochs), "--set", f"model.cell={cell}"]
    for s in SIZES[size]:
        cmd += ["--set", s]
    if lr is not None:
        cmd += ["--set", f"train.lr={lr}"]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t = time.time()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.time() - t
    row = {"size": size, "cell": cell, "lr": lr if lr is not None else 20.0, "wall_s": wall}
    if p.returncode != 0:
        row["error"] = (p.stderr.strip().splitlines() or ["exit code %d" % p.returncode])[-1]
        return row
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    row.update(test_ppl=s["test_ppl"], test_bpc=s["test_bpc"], params=s["num_parameters"],
               tokens_per_s=s["epochs"][-1]["tokens_per_s"], valid=[e["valid_ppl"] for e in s["epochs"]])
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release/ptb-lm"))
    ap.add_argument("--out", default="runs/cells")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--sizes", default="rnnlm,2x100")
    ap.add_argument("--cells", default="lstm,gru,rnn_tanh,rnn_relu")
    ap.add_argument("--lr", action="append", default=[], help="CELL=LR: an extra row at another learning rate")
    ap.add_argument("--data-dir")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (give each --threads 1 on 2 cores)")
    args = ap.parse_args()
    extra = [(c, float(l)) for c, l in (x.split("=") for x in args.lr)]
    todo = [(size, cell, None) for size in args.sizes.split(",") for cell in args.cells.split(",")]
    todo += [(size, cell, lr) for size in args.sizes.split(",") for cell, lr in extra]

    def one(job):
        row = run(args, *job)
        print(json.dumps(row), flush=True)
        return row

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(one, todo))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print("\n| size | cell | lr | test ppl | test bpc | parameters | train tokens/s | minutes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['size']} | {r['cell']} | {r['lr']:g} | did not train: {r['error']} | | | | {r['wall_s'] / 60:.1f} |")
        else:
            print(f"| {r['size']} | {r['cell']} | {r['lr']:g} | {r['test_ppl']:.1f} | {r['test_bpc']:.3f} | "
                  f"{r['params']:,} | {r['tokens_per_s'] / 1000:.1f}k | {r['wall_s'] / 60:.1f} |")


if __name__ == "__main__":
    main()
