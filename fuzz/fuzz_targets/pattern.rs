//! Fuzz target: path patterns (DESIGN §3.1). Input is `pattern\npath`. Checks that parsing and
//! matching never panic, and that the operation trie agrees with the reference matcher.
#![no_main]

use credbroker::policy::{OperationRouter, Pattern};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (source, path) = s.split_once('\n').unwrap_or((s, "/"));
    let Ok(pattern) = Pattern::parse(source) else {
        return;
    };
    let by_reference = pattern.matches(path);
    let mut router = OperationRouter::new();
    router.insert(http::Method::GET, &pattern, 0);
    let by_trie = router.find(&http::Method::GET, path, |_| true).is_some();
    assert_eq!(
        by_reference, by_trie,
        "pattern {source:?} path {path:?}: reference {by_reference}, trie {by_trie}"
    );
    if by_reference {
        assert!(path.starts_with('/'));
    }
});
