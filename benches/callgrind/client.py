#!/usr/bin/env python3
"""Fixed-count keep-alive HTTP/1.1 client for run_callgrind.sh.

usage: client.py HOST:PORT PATH TOKEN|- CONNS WARMUP_PER_CONN MEASURED_TOTAL [BETWEEN_CMD] [AFTER_CMD]

Opens CONNS keep-alive connections, makes WARMUP_PER_CONN calls on each (all connections
concurrently, one thread per connection), runs BETWEEN_CMD (e.g. `callgrind_control -z PID`),
then makes exactly MEASURED_TOTAL calls spread evenly over the same connections, then runs
AFTER_CMD (e.g. `callgrind_control -d PID`). Every answer must be 200 with a body; exits 1
otherwise. Prints the counts.
"""
import http.client
import subprocess
import sys
import threading


def main():
    addr, path, token, conns, warm, total = sys.argv[1:7]
    between = sys.argv[7] if len(sys.argv) > 7 else ""
    after = sys.argv[8] if len(sys.argv) > 8 else ""
    conns, warm, total = int(conns), int(warm), int(total)
    host, port = addr.rsplit(":", 1)
    headers = {"Host": addr}
    if token != "-":
        headers["Authorization"] = "Bearer " + token
    clients = [http.client.HTTPConnection(host, int(port), timeout=600) for _ in range(conns)]
    bad = []

    def work(c, n):
        for _ in range(n):
            c.request("GET", path, headers=headers)
            r = c.getresponse()
            body = r.read()
            if r.status != 200 or not body or r.will_close:
                bad.append((r.status, body[:200]))
                return

    def phase(counts):
        ts = [threading.Thread(target=work, args=(c, n)) for c, n in zip(clients, counts)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    phase([warm] * conns)
    if bad:
        print("warm-up failed:", bad[:3], file=sys.stderr)
        sys.exit(1)
    if between:
        subprocess.run(between, shell=True, check=True)
    counts = [total // conns + (1 if i < total % conns else 0) for i in range(conns)]
    phase(counts)
    if after:
        subprocess.run(after, shell=True, check=True)
    if bad:
        print("measured phase failed:", bad[:3], file=sys.stderr)
        sys.exit(1)
    print(f"ok: {conns} connections, {warm * conns} warm-up calls, {sum(counts)} measured calls")


main()
