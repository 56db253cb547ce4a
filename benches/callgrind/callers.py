#!/usr/bin/env python3
"""callers.py DUMP N REGEX [callees]: the callers (or callees) of functions matching REGEX,
with calls and inclusive Ir per measured call. Same dump format as analyse.py."""
import collections, re, sys
dump, n, rx = sys.argv[1], int(sys.argv[2]), re.compile(sys.argv[3])
mode = sys.argv[4] if len(sys.argv) > 4 else "callers"
edges = collections.Counter(); counts = collections.Counter()
fn = callee = None; pending = None
for line in open(dump, errors="replace"):
    line = line.rstrip("\n")
    if not line: continue
    if line[0].isdigit() or line[0] in "+-*":
        if pending:
            p = line.split(); edges[(fn, callee)] += int(p[1]) if len(p) > 1 else 0
            counts[(fn, callee)] += pending; pending = None
        continue
    k, _, rest = line.partition("=")
    m = re.match(r"\((\d+)\)(?: (.*))?$", rest)
    if k == "fn": fn = rest
    elif k == "cfn": callee = rest
    elif k == "calls": pending = int(rest.split()[0])
rows = [(a, b, v, counts[(a, b)]) for (a, b), v in edges.items() if rx.search(b if mode == "callers" else a)]
for a, b, v, c in sorted(rows, key=lambda r: -r[2])[:40]:
    other = a if mode == "callers" else b
    print(f"{v/n:>9,.0f} Ir {c/n:>7.2f} calls  {other[:150]}   -> {b[:60] if mode=='callers' else ''}")
