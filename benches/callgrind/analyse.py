#!/usr/bin/env python3
"""Per-call tables from one callgrind dump (written with --compress-strings=no
--compress-pos=no --dump-instr=no, as run_callgrind.sh does).

usage: analyse.py DUMP N_CALLS [TOP=30]

Prints, per call (Ir / N):
  - total instructions;
  - the top functions by self cost (by symbol: what callgrind_annotate shows);
  - self cost by crate and by credbroker source file, taken from each instruction's line-table
    file, so code inlined by LTO is charged to the crate/file it was written in, not to the
    function it was inlined into;
  - inclusive cost of groups of functions (a group's self cost plus every call out of the
    group to a function outside it: each instruction counted once unless a call out of the
    group comes back into it, e.g. through a waker — see `reentry` in the table);
  - inclusive cost of named functions (self + callees, as callgrind_annotate --inclusive);
  - calls to the allocator's entry points (mimalloc's mi_*_aligned / mi_free) from outside
    the allocator.
"""
import collections
import re
import sys

dump, n = sys.argv[1], int(sys.argv[2])
TOP = int(sys.argv[3]) if len(sys.argv) > 3 else 30

names = {"fl": {}, "fn": {}, "ob": {}}


def name(kind, rest):
    # "(id) name" defines, "(id)" refers, plain "name" when strings are not compressed
    m = re.match(r"\((\d+)\)(?: (.*))?$", rest)
    table = names["fl" if kind in ("fl", "fi", "fe", "cfi", "cfl") else "fn" if kind in ("fn", "cfn") else "ob"]
    if not m:
        return rest
    if m.group(2) is not None:
        table[m.group(1)] = m.group(2)
    return table.get(m.group(1), "?")


self_fn = collections.Counter()          # fn -> self Ir
self_file = collections.Counter()        # source file -> self Ir
self_fn_obj = {}
self_fn_file = collections.Counter()     # (fn, source file) -> self Ir
edges = collections.Counter()            # (caller, callee) -> inclusive Ir of the calls
edge_calls = collections.Counter()       # (caller, callee) -> number of calls
total = 0
fn = ob = fl = cur_file = None
pending_call = None
with open(dump, errors="replace") as f:
    for line in f:
        line = line.rstrip("\n")
        if not line:
            continue
        c = line[0]
        if c.isdigit() or c in "+-*":
            parts = line.split()
            ir = int(parts[1]) if len(parts) > 1 else 0
            if pending_call is not None:
                edges[(fn, pending_call[0])] += ir
                edge_calls[(fn, pending_call[0])] += pending_call[1]
                pending_call = None
            else:
                self_fn[fn] += ir
                self_file[cur_file] += ir
                self_fn_file[(fn, cur_file)] += ir
                self_fn_obj[fn] = ob
            continue
        key, _, rest = line.partition("=")
        if key == "fn":
            fn = name("fn", rest); cur_file = fl
        elif key == "fl":
            fl = name("fl", rest); cur_file = fl
        elif key in ("fi", "fe"):
            cur_file = name(key, rest)
        elif key == "ob":
            ob = name("ob", rest)
        elif key in ("cfi", "cfl"):
            name(key, rest)
        elif key == "cob":
            name("ob", rest)
        elif key == "cfn":
            callee = name("cfn", rest)
        elif key == "calls":
            pending_call = (callee, int(rest.split()[0]))
        elif line.startswith("totals:") or line.startswith("summary:"):
            total = int(line.split()[1])

total = total or sum(self_fn.values())
pc = lambda v: v / n


def primary_path(fname):
    """The path a symbol is 'about': the self type of `<T as Trait>::m`, the T of
    drop_in_place<T>, else the symbol itself."""
    s = fname
    for _ in range(3):
        m = re.match(r"(?:core::ptr::drop_in_place|core::ptr::real_drop_in_place)<(.*)>$", s)
        if m:
            s = m.group(1); continue
        if s.startswith("<"):
            depth, i = 0, 0
            for i, ch in enumerate(s):
                depth += ch == "<"; depth -= ch == ">"
                if depth == 0:
                    break
            inner = s[1:i]
            s = inner.split(" as ")[0] if " as " in inner else inner
            s = s.lstrip("&*").replace("mut ", "").replace("dyn ", "")
            continue
        break
    return s




def crate_of_file(p):
    if p is None:
        return "?"
    m = re.search(r"/(?:registry/src/[^/]+|rust/deps)/([A-Za-z0-9_\-]+?)-\d+\.\d+[^/]*/", p)
    if m:
        return m.group(1)
    m = re.search(r"/rustc/[0-9a-f]+/library/([a-z_]+)/", p) or re.search(r"/lib/rustlib/src/rust/library/([a-z_]+)/", p)
    if m:
        return "rust-std:" + m.group(1)
    if re.search(r"(^|/)(src|examples)/", p) and "registry" not in p:
        return "credbroker: own source lines"
    return "other: " + p


def own_file(p):
    m = re.search(r"((?:src|examples)/.*)$", p or "")
    return m.group(1) if m else p


print(f"calls measured: {n}")
print(f"total Ir: {total:,}   per call: {pc(total):,.0f}")
print()
print(f"== top {TOP} functions by self cost (Ir per call) ==")
for f_, v in self_fn.most_common(TOP):
    print(f"{pc(v):>9,.0f} {100*v/total:5.1f}%  {f_}")
print()

# unknown-file instructions are charged by object (libc, vdso, ld.so, ...)
by_crate = collections.Counter()
for p, v in self_file.items():
    by_crate[crate_of_file(p)] += v
print("== self cost by crate, from line tables (inlined code charged to where it was written) ==")
for k, v in by_crate.most_common(40):
    print(f"{pc(v):>9,.0f} {100*v/total:5.1f}%  {k}")
print()
def crate_of_fn(fname):
    p = primary_path(fname or "")
    m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)::", p)
    if m:
        return m.group(1)
    if re.match(r"^_?mi_", p):
        return "mimalloc"
    return "(symbol) " + p[:60]


hyb = collections.Counter()
for (f_, p), v in self_fn_file.items():
    c = crate_of_file(p)
    if c.startswith("rust-std") or c.startswith("other") or c == "?":
        c2 = crate_of_fn(f_)
        c = c2 if c2 not in ("core", "alloc", "std") else "rust-std (" + (c if c.startswith("rust-std") else c2) + ")"
        if c == "credbroker":
            c = "credbroker: std/core code inlined into its symbols"
        if c.startswith("(symbol)") and crate_of_file(p).startswith("other"):
            c = "libc etc: " + crate_of_file(p)[7:].split("/")[-1]
    hyb[c.replace("-", "_") if not c.startswith(("libc", "(symbol)", "credbroker", "rust-std")) else c] += v
print("== self cost by crate: line table, but std/libc lines charged to the calling symbol's crate ==")
for k, v in hyb.most_common(30):
    print(f"{pc(v):>9,.0f} {100*v/total:5.1f}%  {k}")
print()
print("== self cost by credbroker source file (incl. code inlined elsewhere) ==")
own = collections.Counter()
for p, v in self_file.items():
    if crate_of_file(p) == "credbroker: own source lines":
        own[own_file(p)] += v
for k, v in own.most_common(40):
    print(f"{pc(v):>9,.0f} {100*v/total:5.1f}%  {k}")
print()
print("== instructions with no line info, by object ==")
unk_obj = collections.Counter()
for p, v in self_file.items():
    if crate_of_file(p).startswith("other") or p in (None, "???"):
        unk_obj[p] += v
for k, v in unk_obj.most_common(10):
    print(f"{pc(v):>9,.0f} {100*v/total:5.1f}%  {k}")
print()

# ---- inclusive ----
out_calls = collections.defaultdict(list)
for (a, b), v in edges.items():
    out_calls[a].append((b, v))
incl = collections.Counter()
for f_ in set(self_fn) | {a for a, _ in edges}:
    incl[f_] = self_fn.get(f_, 0) + sum(v for b, v in out_calls.get(f_, []) if b != f_)


GROUPS = [
    # (label, regex on the primary path)
    ("credbroker::proxy::pipeline", r"^credbroker::proxy::pipeline"),
    ("credbroker::proxy::headers", r"^credbroker::proxy::headers"),
    ("credbroker::proxy::forward (pool, upstream exchange)", r"^credbroker::proxy::forward"),
    ("credbroker::proxy::respond", r"^credbroker::proxy::respond"),
    ("credbroker::proxy::body", r"^credbroker::proxy::body"),
    ("credbroker::proxy::inject", r"^credbroker::proxy::inject"),
    ("credbroker::proxy::redact", r"^credbroker::proxy::redact"),
    ("credbroker::proxy::canonical", r"^credbroker::proxy::canonical"),
    ("credbroker::audit::*", r"^credbroker::audit"),
    ("credbroker::token::*", r"^credbroker::token"),
    ("credbroker::policy::*", r"^credbroker::policy"),
    ("credbroker::admin::metrics", r"^credbroker::admin::metrics"),
    ("credbroker::server (+deadlines)", r"^credbroker::server"),
    ("credbroker::broker", r"^credbroker::broker"),
    ("credbroker::workers", r"^credbroker::workers"),
    ("credbroker::* (all own symbols)", r"^credbroker::"),
    ("hyper::proto::h1", r"^hyper::proto::h1"),
    ("hyper::* (all)", r"^hyper::"),
    ("hyper_util", r"^hyper_util::"),
    ("tokio::runtime (scheduler, timers, io driver)", r"^tokio::runtime"),
    ("tokio::* (all)", r"^tokio::"),
    ("serde_json", r"^serde_json::"),
    ("sha2", r"^sha2::"),
    ("http (HeaderMap etc.)", r"^http::"),
    ("mimalloc (mi_*, _mi_*)", r"^_?mi_"),
    ("bytes", r"^bytes::"),
]
fn_group = {}
for f_ in incl:
    p = primary_path(f_ or "")
    fn_group[f_] = [lab for lab, rx in GROUPS if re.search(rx, p)]


def group_incl(label):
    members = {f_ for f_, labs in fn_group.items() if label in labs}
    selfc = sum(self_fn.get(f_, 0) for f_ in members)
    out = sum(v for (a, b), v in edges.items() if a in members and b not in members)
    # calls from outside into the group whose caller is itself reached from the group
    # (re-entry) would be double-counted; report how much enters the group from outside
    into = sum(v for (a, b), v in edges.items() if b in members and a not in members)
    return selfc, selfc + out, into


print("== groups of functions (by symbol; Ir per call) ==")
print(f"{'self':>9} {'inclusive':>10} {'entering':>10}  group")
for lab, _ in GROUPS:
    s, i, into = group_incl(lab)
    print(f"{pc(s):>9,.0f} {pc(i):>10,.0f} {pc(into):>10,.0f}  {lab}")
print("('entering' = inclusive cost of calls into the group from outside it; when it is well")
print(" below 'inclusive', part of the group runs as the root of a task poll or thread.)")
print()

print("== top 60 functions by inclusive cost (Ir per call; recursion may overcount) ==")
for f_, v in incl.most_common(60):
    print(f"{pc(v):>10,.0f} {100*v/total:5.1f}%  {f_}")
print()

print("== inclusive cost of credbroker functions (top 60) ==")
k = 0
for f_, v in incl.most_common():
    if re.match(r"^credbroker::", primary_path(f_ or "")):
        print(f"{pc(v):>10,.0f} {100*v/total:5.1f}%  self {pc(self_fn.get(f_,0)):>7,.0f}  {f_}")
        k += 1
        if k >= 60:
            break
print()

print("== allocator entry points: calls per call (from outside the allocator) ==")
alloc_fns = collections.Counter()
alloc_ir = collections.Counter()
for (a, b), cnt in edge_calls.items():
    if b and re.match(r"^(mi_|_mi_|__rust_alloc|__rust_dealloc|__rust_realloc|malloc$|free$|realloc$|calloc$)", b) \
            and not re.match(r"^(_?mi_|__rust_)", a or ""):
        alloc_fns[b] += cnt
        alloc_ir[b] += edges[(a, b)]
for b, cnt in alloc_fns.most_common():
    print(f"{cnt / n:>8.2f} calls  {pc(alloc_ir[b]):>7,.0f} Ir  {b}")
print()
print("== top callers of allocation functions (mi_malloc_aligned/mi_zalloc_aligned/mi_realloc_aligned) per call ==")
callers = collections.Counter()
for (a, b), cnt in edge_calls.items():
    if b in ("mi_malloc_aligned", "mi_zalloc_aligned", "mi_realloc_aligned", "malloc", "calloc", "realloc"):
        if not re.match(r"^(_?mi_|__rust_)", a or ""):
            callers[(a, b)] += cnt
for (a, b), cnt in callers.most_common(45):
    print(f"{cnt / n:>6.2f}  {b:<20} {a}")
