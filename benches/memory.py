#!/usr/bin/env python3
"""RSS of a running credbroker: idle, with N idle keep-alive client connections, per connection.

usage: benches/memory.py PID HOST:PORT TOKEN [N=10000]
Each connection sends one allowed request (keep-alive) and then stays open, idle.
Only the given loopback address is contacted; the script closes everything when done.
"""
import resource, socket, sys, time

def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

def main():
    pid, addr, token = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 10000
    host, port = addr.rsplit(":", 1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 1024)), hard))
    idle = rss_kib(pid)
    req = (f"GET /github/repos/acme/widget/issues HTTP/1.1\r\nHost: {addr}\r\n"
           f"Authorization: Bearer {token}\r\n\r\n").encode()
    socks, ok = [], 0
    for _ in range(n):
        s = socket.create_connection((host, int(port)))
        s.sendall(req)
        socks.append(s)
    for s in socks:
        s.settimeout(5)
        if s.recv(65536).startswith(b"HTTP/1.1 200"):
            ok += 1
    time.sleep(1)
    loaded = rss_kib(pid)
    print(f"idle RSS {idle} KiB; with {n} idle keep-alive connections ({ok} answered 200) "
          f"{loaded} KiB; {(loaded - idle) * 1024 / n:.0f} bytes per idle connection")
    for s in socks:
        s.close()

if __name__ == "__main__":
    main()
