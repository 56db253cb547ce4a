//! Audit log benches: (a) sealing one record (serialise + chain hash); (b) append throughput
//! with 1, 16 and 256 concurrent tokio tasks under each fsync policy, into a temp dir.
//!
//! Throughput is in records per second. `always` with one task pays one fdatasync per record,
//! so its iterations are smaller to keep the whole bench short.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use credbroker::audit::chain::{self, ZERO_HASH};
use credbroker::audit::{AuditLog, AuditOptions, Decision, Event, FsyncPolicy, Record};
use credbroker::secret::Secret;

/// A typical allowed proxy call's record.
fn sample() -> Record {
    let mut r = Record::new(Event::Proxy);
    r.request_id = Some("01JDQ3W6ZK4M5N6P7Q8R9S0T1V".into());
    r.client = Some("triage-bot".into());
    r.connector = Some("github".into());
    r.operation = Some("list_issues".into());
    r.method = Some("GET".into());
    r.path = Some("/repos/acme/widget/issues".into());
    r.query = Some("state=open&per_page=50".into());
    r.jti = Some("c2f1b7e0-5d2a-4a59-9a8e-3c0f6f1d2b7a".into());
    r.peer = Some("10.0.3.17:53122".into());
    r.decision = Some(Decision::Allow);
    r
}

fn seal(c: &mut Criterion) {
    let rec = sample();
    let ts = "2026-11-26T05:03:25.123456Z";
    let key = Secret::new(vec![7u8; 32]);
    let mut group = c.benchmark_group("seal");
    group.throughput(Throughput::Elements(1));
    group.bench_function("sha256", |b| {
        b.iter(|| chain::seal(black_box(42), ts, black_box(&rec), ZERO_HASH, None))
    });
    group.bench_function("hmac_sha256", |b| {
        b.iter(|| chain::seal(black_box(42), ts, black_box(&rec), ZERO_HASH, Some(&key)))
    });
    group.finish();
}

/// Records per measured iteration.
fn records_per_iter(policy: FsyncPolicy, tasks: usize) -> usize {
    match (policy, tasks) {
        (FsyncPolicy::Always, 1) => 200,
        _ => 2000,
    }
}

/// Appends `total` records from `tasks` concurrent tasks and waits for all of them.
async fn append_all(log: &AuditLog, tasks: usize, total: usize) {
    let per_task = total / tasks;
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let log = log.clone();
            tokio::spawn(async move {
                for _ in 0..per_task {
                    // A failed append would make the figures meaningless.
                    log.append(sample()).await.expect("append failed");
                }
            })
        })
        .collect();
    for h in handles {
        h.await.expect("task panicked");
    }
}

fn append(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut group = c.benchmark_group("append");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(3));
    for policy in [
        FsyncPolicy::Always,
        FsyncPolicy::Interval,
        FsyncPolicy::Never,
    ] {
        for tasks in [1usize, 16, 256] {
            let total = records_per_iter(policy, tasks);
            group.throughput(Throughput::Elements(total as u64));
            let id = BenchmarkId::new(format!("{policy:?}").to_lowercase(), tasks);
            group.bench_with_input(id, &tasks, |b, &tasks| {
                // CREDBROKER_BENCH_DIR picks the disk to measure (default: the system temp dir).
                let dir = match std::env::var_os("CREDBROKER_BENCH_DIR") {
                    Some(d) => tempfile::tempdir_in(d),
                    None => tempfile::tempdir(),
                }
                .expect("temp dir");
                let log = AuditLog::open(AuditOptions {
                    path: dir.path().join("audit.jsonl"),
                    fsync: policy,
                    rotate_bytes: None,
                    hmac_key: None,
                    replica: None,
                })
                .expect("open audit log");
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        rt.block_on(append_all(&log, tasks, total));
                    }
                    start.elapsed()
                });
                log.close();
            });
        }
    }
    group.finish();
}

criterion_group!(benches, seal, append);
criterion_main!(benches);
