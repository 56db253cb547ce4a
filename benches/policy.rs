//! Hot-path benchmarks for check 1 and operation matching (DESIGN §3.1, §4.3): the canonical
//! path check, and router lookups whose cost must stay flat as operations are added.
//!
//! Operations are spread over 100 connectors (as a broker would hold them: one router per
//! connector behind a name lookup), with 1, 100 and 10,000 operations in total.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::Method;

use credbroker::policy::{OperationRouter, Pattern};
use credbroker::proxy::canonical::check_path;

const CONNECTORS: usize = 100;

/// A mix of shapes seen in real APIs: literals, params, deeper paths. Operation 0 (the one
/// looked up) always has the deepest shape, so every run measures the same path.
fn pattern_for(op: usize) -> String {
    match (op / CONNECTORS + 2) % 4 {
        0 => format!("/orgs/org{op}/repos"),
        1 => format!("/repos/org{op}/{{repo}}/issues"),
        2 => format!("/repos/org{op}/{{repo}}/issues/{{number}}/comments"),
        _ => format!("/repos/org{op}/{{repo}}/pulls/{{number}}"),
    }
}

/// `total` operations spread round-robin over the connectors (some get none when total < 100).
fn build(total: usize) -> HashMap<String, OperationRouter> {
    let mut connectors: HashMap<String, OperationRouter> = (0..CONNECTORS)
        .map(|c| (format!("conn{c}"), OperationRouter::new()))
        .collect();
    for op in 0..total {
        let pattern = Pattern::parse(&pattern_for(op)).expect("bench patterns are valid");
        let router = connectors
            .get_mut(&format!("conn{}", op % CONNECTORS))
            .expect("connector exists");
        router.insert(Method::GET, &pattern, op);
    }
    connectors
}

fn bench_check_path(c: &mut Criterion) {
    c.bench_function("check_path/typical", |b| {
        b.iter(|| check_path(black_box("/github/repos/acme/widget/issues/1234/comments")))
    });
}

fn bench_router(c: &mut Criterion) {
    let mut group = c.benchmark_group("router_find");
    for total in [1usize, 100, 10_000] {
        let connectors = build(total);
        // Operation 0 on `conn0`, which holds 1, 1 and 100 operations in the three runs.
        let op = 0;
        let connector = "conn0".to_owned();
        let path = pattern_for(op)
            .replace("{repo}", "widget")
            .replace("{number}", "1234");
        group.bench_with_input(BenchmarkId::from_parameter(total), &total, |b, _| {
            b.iter(|| {
                let router = connectors.get(black_box(connector.as_str()))?;
                router.find(&Method::GET, black_box(&path), |_| true)
            })
        });
        assert_eq!(
            connectors[&connector].find(&Method::GET, &path, |_| true),
            Some(op)
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_check_path, bench_router
}
criterion_main!(benches);
