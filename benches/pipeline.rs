//! The whole in-process pipeline against a loopback upstream: one keep-alive client sends a
//! proxied GET through a real broker (token check, allowlist, rate-limit-free, audit with
//! fsync=never and =always) to a minimal hyper upstream; compared with calling the upstream
//! directly over the same kind of connection.
//!
//! `cargo bench --bench pipeline`

use criterion::{criterion_group, criterion_main, Criterion};

mod support;
use support::{config, connect, get, token, upstream, CREDENTIAL};

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let up = rt.block_on(upstream());
    let mut group = c.benchmark_group("pipeline");
    group.sample_size(30);

    let mut direct = rt.block_on(connect(up));
    let auth = format!("Bearer {CREDENTIAL}");
    // Requests go one after another on one keep-alive connection: latency, not throughput.
    group.bench_function("direct_upstream_get", |b| {
        b.iter_custom(|n| {
            rt.block_on(async {
                let start = std::time::Instant::now();
                for _ in 0..n {
                    get(&mut direct, "/repos/acme/widget/issues", &auth).await;
                }
                start.elapsed()
            })
        })
    });
    for fsync in ["never", "always"] {
        let sub = dir.path().join(fsync);
        std::fs::create_dir_all(&sub).unwrap();
        let running = rt
            .block_on(credbroker::cli::serve::start(config(&sub, up, fsync)))
            .unwrap();
        let addr = running.proxy_addr;
        let bearer = format!("Bearer {}", rt.block_on(token(addr)));
        let mut client = rt.block_on(connect(addr));
        group.bench_function(format!("through_broker_fsync_{fsync}"), |b| {
            b.iter_custom(|n| {
                rt.block_on(async {
                    let start = std::time::Instant::now();
                    for _ in 0..n {
                        get(&mut client, "/github/repos/acme/widget/issues", &bearer).await;
                    }
                    start.elapsed()
                })
            })
        });
        rt.block_on(running.shutdown());
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
