//! Secret values and the `env:` / `file:` / `literal:` references that name them (DESIGN §3).
//!
//! A [`Secret`] never prints its value: `Debug` shows `Secret(**REDACTED**)`, there is no
//! `Display` and no `Serialize`, the bytes are zeroized on drop, and the only way to the
//! bytes is [`Secret::expose`] — grep for it to audit every use.

use std::fmt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// Bytes that must never reach a log line, an error message or an audit record.
///
/// ```
/// use credbroker::secret::Secret;
///
/// let s = Secret::new("ghs_real_credential");
/// assert_eq!(format!("{s:?}"), "Secret(**REDACTED**)");
/// assert_eq!(s.expose(), b"ghs_real_credential");
/// ```
#[derive(Clone)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(Zeroizing::new(bytes.into()))
    }

    /// The secret's bytes. Every caller is a place the secret leaves this type.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Constant-time, so comparing a reloaded secret with the one in force leaks nothing.
impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq;
        bool::from(self.0.as_slice().ct_eq(other.0.as_slice()))
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(**REDACTED**)")
    }
}

/// Where a secret comes from. `literal:` is for tests and demos (`check` warns about it).
#[derive(Clone, Debug)]
pub enum SecretRef {
    Env(String),
    /// The file, and whether the reference as written may be a secret pasted after `file:`
    /// (then an error does not show it).
    File {
        path: PathBuf,
        suspect: bool,
    },
    Literal(Secret),
}

/// Why a secret reference could not be parsed or resolved. Never contains the secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// The reference has no `env:`, `file:` or `literal:` prefix.
    #[error("a secret must be a reference `env:NAME`, `file:PATH` or `literal:VALUE`")]
    BadReference,
    /// The environment variable is not set (or not valid UTF-8).
    #[error("environment variable {} is not set", shown_variable(.0))]
    EnvMissing(String),
    /// The file could not be read.
    #[error("cannot read secret file {}: {cause}", shown_path(path, *suspect))]
    FileUnreadable {
        path: PathBuf,
        /// The reference as written may be a pasted secret: the path is not shown.
        suspect: bool,
        cause: std::io::Error,
    },
}

/// Whether a name given after `env:` or `file:` may be the secret itself, pasted after the
/// prefix: shaped like a token, or long, without an extension, and mixing letters and
/// digits. Such a name is not repeated in an error (errors reach logs, `check`'s output, the
/// admin API's answer and the audit log); the key and line still say where it is.
fn may_be_pasted_secret(name: &str) -> bool {
    let mixed =
        name.bytes().any(|b| b.is_ascii_digit()) && name.bytes().any(|b| b.is_ascii_alphabetic());
    name.starts_with("eyJ")
        || (mixed && name.len() >= 16 && !name.contains('.'))
        // Some keys hold dots (`SG.…`): no file name is that long and that mixed.
        || (mixed && name.len() >= 40)
}

/// The variable's name as an error shows it: a conventional `UPPER_CASE` name as it is, and
/// anything else unless it may be a pasted secret.
fn shown_variable(name: &str) -> String {
    // Upper case with digits and no `_`, 16 characters or more, is a key id or a base32 seed
    // (`AKIA…`, `JBSWY3DPEHPK3PXP…`) more often than a variable's name.
    let key_like =
        name.len() >= 16 && !name.contains('_') && name.bytes().any(|b| b.is_ascii_digit());
    let conventional = !key_like
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    let plausible = name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if conventional || (plausible && !may_be_pasted_secret(name)) {
        name.to_owned()
    } else {
        "(its name not shown: it may be a secret pasted after `env:`)".to_owned()
    }
}

/// Whether a `file:` reference as written may be a pasted secret: any part of it (whatever
/// the error will be: one too long for a file name is not "not found"; a secret may hold a
/// `/`). The config's own folder is not judged: it is not what was written.
fn path_may_be_pasted_secret(written: &str) -> bool {
    may_be_pasted_secret(written)
        || Path::new(written)
            .components()
            .any(|c| c.as_os_str().to_str().is_none_or(may_be_pasted_secret))
}

/// The path as an error shows it: none of it if the reference may be a pasted secret.
fn shown_path(path: &Path, suspect: bool) -> String {
    if suspect {
        "(its path not shown: it may be a secret pasted after `file:`)".to_owned()
    } else {
        path.display().to_string()
    }
}

impl SecretRef {
    /// Parses `env:NAME`, `file:PATH` (relative to `base_dir`) or `literal:VALUE`.
    pub fn parse(reference: &str, base_dir: &Path) -> Result<Self, SecretError> {
        if let Some(name) = reference.strip_prefix("env:") {
            if name.is_empty() {
                return Err(SecretError::BadReference);
            }
            Ok(Self::Env(name.to_owned()))
        } else if let Some(path) = reference.strip_prefix("file:") {
            if path.is_empty() {
                return Err(SecretError::BadReference);
            }
            Ok(Self::File {
                path: base_dir.join(path),
                suspect: path_may_be_pasted_secret(path),
            })
        } else if let Some(value) = reference.strip_prefix("literal:") {
            Ok(Self::Literal(Secret::new(value.as_bytes())))
        } else {
            Err(SecretError::BadReference)
        }
    }

    /// Reads the referenced bytes as they are, dropping one trailing newline of a file.
    pub fn resolve(&self) -> Result<Secret, SecretError> {
        match self {
            Self::Env(name) => std::env::var_os(name)
                .map(|v| Secret::new(v.into_encoded_bytes()))
                .ok_or_else(|| SecretError::EnvMissing(name.clone())),
            Self::File { path, suspect } => {
                let mut bytes =
                    std::fs::read(path).map_err(|cause| SecretError::FileUnreadable {
                        path: path.clone(),
                        suspect: *suspect,
                        cause,
                    })?;
                if bytes.last() == Some(&b'\n') {
                    bytes.pop();
                }
                Ok(Secret::new(bytes))
            }
            Self::Literal(secret) => Ok(secret.clone()),
        }
    }

    pub fn is_literal(&self) -> bool {
        matches!(self, Self::Literal(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::new("hunter2-sentinel");
        assert_eq!(format!("{s:?}"), "Secret(**REDACTED**)");
        let r = SecretRef::parse("literal:hunter2-sentinel", Path::new(".")).unwrap();
        assert!(!format!("{r:?}").contains("hunter2"));
    }

    #[test]
    fn an_error_does_not_repeat_a_secret_pasted_after_the_prefix() {
        let dir = Path::new("/etc/credbroker");
        for pasted in [
            "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
            "eyJhbGciOiJFZERTQSJ9.e30.c2ln",
            "xoxb-1234567890-abcdef",
            "SG.abcdefghijklmnopqrstuv.WXYZ0123456789abcdefghijklmnopqrstuvwxyz0123",
            "abc123XYZdef/456GHIjkl789mno",
            &"eyJ0eXAiOiJhdCtqd3QifQ".repeat(14),
            "JBSWY3DPEHPK3PXP2Q7Z",
        ] {
            for prefix in ["env:", "file:"] {
                let err = SecretRef::parse(&format!("{prefix}{pasted}"), dir)
                    .unwrap()
                    .resolve()
                    .unwrap_err()
                    .to_string();
                assert!(!err.contains(pasted), "{err}");
                assert!(!err.contains("456GHI"), "{err}");
                assert!(err.contains("not shown"), "{err}");
            }
        }
        // Real names are shown, as they help.
        for name in ["GITHUB_ORG_TOKEN_NOT_SET_1", "my_token"] {
            let err = SecretRef::parse(&format!("env:{name}"), dir)
                .unwrap()
                .resolve();
            assert!(err.unwrap_err().to_string().contains(name));
        }
        let err = SecretRef::parse("file:../certs/github-app.pem", dir)
            .unwrap()
            .resolve();
        assert!(err.unwrap_err().to_string().contains("github-app.pem"));
    }

    #[test]
    fn file_secret_drops_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s"), b"abc\n\n").unwrap();
        let r = SecretRef::parse("file:s", dir.path()).unwrap();
        assert_eq!(r.resolve().unwrap().expose(), b"abc\n");
    }

    #[test]
    fn references_need_a_prefix() {
        assert!(matches!(
            SecretRef::parse("plain", Path::new(".")),
            Err(SecretError::BadReference)
        ));
        assert!(matches!(
            SecretRef::parse("env:CREDBROKER_TEST_SURELY_UNSET", Path::new("."))
                .unwrap()
                .resolve(),
            Err(SecretError::EnvMissing(_))
        ));
    }
}
