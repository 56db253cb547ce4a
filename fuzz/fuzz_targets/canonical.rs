//! Fuzz target: the canonical request check (DESIGN §4.3 row 1). Besides "never panics", an
//! oracle: a path the check accepts must mean the same thing to every upstream — decoding
//! its percent-escapes must not create a `/`, `\`, `.`/`..` segment, control byte or `%`.
#![no_main]

use credbroker::proxy::canonical::{check_path, check_query, check_target, percent_decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = check_query(s);
    if let Ok(uri) = s.parse::<http::Uri>() {
        if check_target(&uri).is_ok() {
            assert!(uri.scheme().is_none() && uri.authority().is_none(), "{s:?}");
            assert!(check_path(uri.path()).is_ok());
        }
    }
    if check_path(s).is_err() {
        return;
    }
    assert!(s.starts_with('/'), "{s:?}");
    assert!(s.bytes().all(|b| b.is_ascii_graphic()), "{s:?}");
    let decoded = percent_decode(s).expect("an accepted path decodes");
    assert_eq!(
        decoded.iter().filter(|&&b| b == b'/').count(),
        s.bytes().filter(|&b| b == b'/').count(),
        "decoding {s:?} creates a '/'"
    );
    assert!(
        !decoded
            .iter()
            .any(|&b| b == b'\\' || b == b'%' || b < 0x20 || b >= 0x7f),
        "decoding {s:?} creates a forbidden byte"
    );
    for segment in decoded.split(|&b| b == b'/').skip(1) {
        assert!(
            segment != b"." && segment != b"..",
            "{s:?} has a dot segment once decoded"
        );
    }
});
