//! Token hot path: issuing (signing) an access token, verifying it cold, and verifying it
//! through the verified-token cache.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};

use credbroker::token::{new_jti, AccessClaims, SigningKeys, TokenVerifier};

const ISS: &str = "https://broker.bench";
const NOW: i64 = 1_800_000_000;

fn claims() -> AccessClaims {
    AccessClaims {
        iss: ISS.to_owned(),
        sub: "sync-bot".to_owned(),
        client_id: Some("sync-bot".to_owned()),
        aud: ISS.to_owned(),
        iat: NOW,
        nbf: NOW,
        exp: NOW + 300,
        jti: new_jti(),
        scope: "github:issues.read github:repos.read slack:chat.post".to_owned(),
        authorization_details: None,
        max_uses: None,
        cnf: None,
    }
}

fn token(c: &mut Criterion) {
    let keys = Arc::new(SigningKeys::ephemeral());
    let verifier = TokenVerifier::new(Arc::clone(&keys), ISS.to_owned(), 60);
    let claims = claims();
    let token = keys.sign(&claims).expect("signing works");

    let mut group = c.benchmark_group("token");
    group.sample_size(20);
    group.bench_function("issue", |b| {
        b.iter(|| keys.sign(black_box(&claims)).expect("signing works"))
    });
    group.bench_function("verify_cold", |b| {
        b.iter(|| verifier.verify(black_box(&token), NOW).expect("valid"))
    });
    verifier.verify_cached(&token, NOW).expect("valid");
    group.bench_function("verify_cached", |b| {
        b.iter(|| {
            verifier
                .verify_cached(black_box(&token), NOW)
                .expect("valid")
        })
    });
    group.finish();
}

criterion_group!(benches, token);
criterion_main!(benches);
