//! Fuzz target: config parsing (DESIGN §3). Any text must give a `Config` or a list of
//! errors, never a panic. Relative paths resolve under a folder that does not exist.
#![no_main]

use std::path::Path;

use credbroker::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse(text, Path::new("/nonexistent/credbroker-fuzz.toml")) {
        // A config that loads is usable: every connector can be found by its name.
        for c in &config.connectors {
            assert!(config.connector(&c.name).is_some());
        }
    }
});
