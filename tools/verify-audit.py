#!/usr/bin/env python3
"""Verify a credbroker audit chain without the credbroker binary (DESIGN §5).

usage: verify-audit.py FILE... [--hmac-key-env NAME]
Files in chain order (audit.jsonl.1 audit.jsonl.2 ... audit.jsonl). Exit 0 intact, 1 broken.
"""
import hashlib, hmac, json, os, sys

def main(argv):
    key = None
    if "--hmac-key-env" in argv:
        i = argv.index("--hmac-key-env")
        key = os.environb[argv[i + 1].encode()]
        argv = argv[:i] + argv[i + 2:]
    prev, seq, n = "0" * 64, None, 0
    for path in argv:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.endswith(b"\n"):
                    return fail(path, lineno, "torn line (no newline)")
                line = line[:-1]
                cut = line.rfind(b',"hash":"')
                if cut < 0 or not line.endswith(b'"}'):
                    return fail(path, lineno, "hash is not the last member")
                stored = line[cut + 9:-2].decode()
                body = line[:cut] + b"}"
                digest = (hmac.new(key, body, hashlib.sha256) if key else hashlib.sha256(body)).hexdigest()
                if digest != stored:
                    return fail(path, lineno, "hash mismatch")
                record = json.loads(line)
                if record["prev"] != prev:
                    return fail(path, lineno, "prev does not link to the previous record")
                if (seq is None and record["seq"] != 1) or (seq is not None and record["seq"] != seq + 1):
                    return fail(path, lineno, "seq gap")
                prev, seq, n = stored, record["seq"], n + 1
    print(f"intact: {n} records, last hash {prev}")
    return 0

def fail(path, lineno, why):
    print(f"broken: {path}:{lineno}: {why}")
    return 1

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
