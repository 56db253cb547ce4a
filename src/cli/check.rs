//! `credbroker check`: every error and warning of DESIGN §3.6, one a line.

use std::path::Path;
use std::process::ExitCode;

use crate::config::lint::{self, Severity};

/// Prints the findings; exit 0 when there is no error (warnings allowed), 1 otherwise.
pub fn run(path: &Path) -> ExitCode {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            println!("error: {}: cannot read config: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    let findings = lint::check(&text, path, chrono::Utc::now());
    for f in &findings {
        println!("{f}");
    }
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    let warnings = findings.len() - errors;
    eprintln!(
        "{}: {errors} error(s), {warnings} warning(s)",
        path.display()
    );
    if errors > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
