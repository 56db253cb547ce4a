# Shared by benches/load.sh and benches/ab.sh (sourced): the fast loopback upstream, the
# broker's bench config, and the small helpers around them. Loopback addresses only.

# Installs wrk and nginx with apt when missing.
need_wrk_and_nginx() {
  command -v wrk >/dev/null 2>&1 && command -v nginx >/dev/null 2>&1 && return
  apt-get update -qq && apt-get install -y -qq wrk nginx-light || apt-get install -y -qq wrk nginx
}

# nginx_conf DIR HTTP_BODY: a one-worker nginx whose pid and error log live in DIR.
nginx_conf() {
  mkdir -p "$1"
  cat > "$1/nginx.conf" <<NGX
worker_processes 1;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  $2
}
NGX
}

# upstream_server LISTEN CREDENTIAL: the fast upstream's server block — a small JSON body,
# only for the credential. No `reuseport`: a server left over from an aborted run then makes
# the start fail, instead of silently sharing the port (and the load) with it.
upstream_server() {
  echo "server { listen $1; location / {
    if (\$http_authorization != 'Bearer $2') { return 401; }
    default_type application/json; return 200 '{\"ok\":true,\"issues\":[]}'; } }"
}

# upstream_and_nginx_proxy DIR UPSTREAM NGINX_PROXY CREDENTIAL: starts, on CPU 1, the fast
# upstream (in DIR/up) and the bar — nginx proxy_pass injecting the credential, no checks
# (in DIR/px).
upstream_and_nginx_proxy() {
  nginx_conf "$1/up" "$(upstream_server "$2" "$4")"
  nginx_conf "$1/px" "upstream backend { server $2; keepalive 512; }
  server { listen $3; location / {
    proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection '';
    proxy_set_header Authorization 'Bearer $4'; } }"
  taskset -c 1 nginx -c "$1/up/nginx.conf" -p "$1/up"
  taskset -c 1 nginx -c "$1/px/nginx.conf" -p "$1/px"
}

# broker_conf FILE LISTEN FSYNC UPSTREAM CREDENTIAL CLIENT_SECRET: one connector `github`
# with one operation, one client `bench` granted it; the audit log next to FILE.
broker_conf() {
  mkdir -p "$(dirname "$1")"
  cat > "$1" <<TOML
[server]
listen = "$2"
max_connections = 20000
[tokens]
max_ttl = "3600s"
[audit]
path = "audit.jsonl"
fsync = "$3"
[[connectors]]
name = "github"
owner = "bench@example"
purpose = "load comparison"
expires = "2099-01-01"
upstream = "http://$4"
credential = "literal:$5"
  [[connectors.operations]]
  name = "issues.read"
  method = "GET"
  path = "/repos/acme/{repo}/issues"
[[clients]]
id = "bench"
owner = "bench@example"
secret_sha256 = "$(printf %s "$6" | sha256sum | cut -d' ' -f1)"
grants = [ { connector = "github", operations = ["issues.read"] } ]
TOML
}

# wait_http ADDR: until something answers HTTP there (at most 5 s).
wait_http() {
  for _ in $(seq 50); do curl -s -o /dev/null "http://$1/" && return; sleep 0.1; done
}

# broker_token ADDR CLIENT_SECRET: an hour's token for github:issues.read.
broker_token() {
  curl -s -u "bench:$2" -d grant_type=client_credentials -d scope=github:issues.read -d ttl=3600 \
    "http://$1/oauth2/token" | sed -E 's/.*"access_token":"([^"]+)".*/\1/'
}
