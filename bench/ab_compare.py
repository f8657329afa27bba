"""Same-run A/B of two bench_ffn builds: ``python3 bench/ab_compare.py A1.jsonl B1.jsonl [A2.jsonl B2.jsonl ...]``.

Each file holds the JSON lines of one ``bench_ffn --suite quick`` run; A and B runs are
interleaved by the caller (A, B, A, B) so that clock and thermal drift hit both. For every twell
record (bench ``ffn_sparse``, ``ffn_auto``, ``gate_pack``) it matches the case (bench, D, H, M,
pattern, p, kernels, slots) across the files, takes the best median time of each side, and prints
B/A with the spread of repeated runs of the same side (the noise). Exit status 1 when a case is
slower in B by more than the noise and 3%, 0 otherwise; a JSON summary is written to stdout's last
line.
"""

import json
import math
import sys
from collections import defaultdict

KEY = ("bench", "D", "H", "M", "pattern", "p", "kernels", "slots")
TWELL = {"ffn_sparse", "ffn_auto", "gate_pack"}


def load(path):
    out = {}
    for line in open(path):
        line = line.strip()
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        if r.get("bench") in TWELL and "ms" in r:
            out[tuple(r.get(k) for k in KEY)] = r["ms"]
    return out


def main(argv):
    if len(argv) < 2 or len(argv) % 2:
        print(__doc__, file=sys.stderr)
        return 2
    sides = {"A": defaultdict(list), "B": defaultdict(list)}
    for i, path in enumerate(argv):
        for k, ms in load(path).items():
            sides["A" if i % 2 == 0 else "B"][k].append(ms)
    rows, worse = [], []
    for k in sorted(set(sides["A"]) & set(sides["B"]), key=lambda k: tuple(str(v) for v in k)):
        a, b = sides["A"][k], sides["B"][k]
        noise = max((max(v) - min(v)) / min(v) for v in (a, b))
        ratio = min(b) / min(a)
        rows.append((k, min(a), min(b), ratio, noise))
        if ratio > 1 + max(noise, 0.03):
            worse.append(k)
    print(f"{'case':<60} {'A ms':>9} {'B ms':>9} {'B/A':>6} {'noise':>6}")
    for k, a, b, ratio, noise in rows:
        name = " ".join(str(v) for v in k)
        print(f"{name:<60} {a:9.4f} {b:9.4f} {ratio:6.3f} {noise:6.1%}{'  SLOWER' if k in worse else ''}")
    ratios = [r[3] for r in rows]
    summary = {"bench": "ab_compare", "cases": len(rows), "slower_beyond_noise": len(worse),
               "min_ratio": min(ratios) if ratios else None, "max_ratio": max(ratios) if ratios else None,
               "geomean_ratio": math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None}
    print(json.dumps(summary))
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
