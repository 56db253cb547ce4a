//! Fuzz target: token verification (DESIGN §4.2, RFC 8725). The first input byte picks the
//! mode: even → the rest is a token string as sent; odd → the rest is a list of
//! (position, xor) edits applied to a genuine token. Oracle: only the genuine token verifies.
#![no_main]

use std::sync::{Arc, OnceLock};

use credbroker::token::{AccessClaims, SigningKeys, TokenVerifier};
use libfuzzer_sys::fuzz_target;

/// The verification time: fixed, so a run is reproducible.
const NOW: i64 = 1_900_000_000;

struct Fixture {
    verifier: TokenVerifier,
    token: String,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let keys = Arc::new(SigningKeys::ephemeral());
        let claims = AccessClaims {
            iss: "credbroker-fuzz".into(),
            sub: "bot".into(),
            aud: "credbroker-fuzz".into(),
            iat: NOW,
            nbf: NOW,
            exp: NOW + 300,
            jti: "0123456789abcdef0123456789abcdef".into(),
            scope: "github:issues.read".into(),
            authorization_details: None,
            max_uses: None,
            cnf: None,
        };
        let token = keys.sign(&claims).expect("signing works");
        let verifier = TokenVerifier::new(keys, "credbroker-fuzz".into(), 5);
        assert!(
            verifier.verify(&token, NOW).is_ok(),
            "the genuine token verifies"
        );
        Fixture { verifier, token }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let candidate = if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        let mut bytes = f.token.clone().into_bytes();
        for edit in rest.chunks_exact(3) {
            let pos = usize::from(u16::from_le_bytes([edit[0], edit[1]])) % bytes.len();
            bytes[pos] ^= edit[2];
        }
        String::from_utf8_lossy(&bytes).into_owned()
    };
    if f.verifier.verify(&candidate, NOW).is_ok() {
        assert_eq!(
            candidate, f.token,
            "a token other than the genuine one verified"
        );
    }
});
