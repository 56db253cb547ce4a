//! `credbroker keygen dev-certs --out DIR`: writes a development CA, a server certificate for
//! localhost and one mTLS client certificate (the clap glue lives elsewhere).

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use crate::tls::{generate_dev_pki, TlsError};

/// The client SAN used when none is given.
pub const DEFAULT_CLIENT_SAN: &str = "spiffe://credbroker.dev/demo-client";

/// File names, in the order they are written.
const FILES: [&str; 6] = [
    "ca.pem",
    "ca-key.pem",
    "server.pem",
    "server-key.pem",
    "client.pem",
    "client-key.pem",
];

/// Writes ca.pem, ca-key.pem, server.pem, server-key.pem, client.pem, client-key.pem into `out`
/// (created if missing), the client certificate with SAN `client_san` (default
/// [`DEFAULT_CLIENT_SAN`]). Private keys get mode 0600, certificates 0644. Refuses to
/// overwrite: if any of the six files exists, nothing is written. Returns the files written.
pub fn write_dev_certs(out: &Path, client_san: Option<&str>) -> Result<Vec<PathBuf>, TlsError> {
    let paths: Vec<PathBuf> = FILES.iter().map(|name| out.join(name)).collect();
    // Checked up front so a refusal leaves no half-written set behind.
    if let Some(existing) = paths.iter().find(|p| p.exists()) {
        return Err(TlsError::Exists {
            path: existing.clone(),
        });
    }
    let san = client_san.unwrap_or(DEFAULT_CLIENT_SAN);
    let pki = generate_dev_pki(&[san])?;
    let client = pki
        .client(san)
        .ok_or_else(|| TlsError::InvalidSan(san.to_owned()))?;
    std::fs::create_dir_all(out).map_err(|source| TlsError::Write {
        path: out.to_owned(),
        source,
    })?;
    let contents: [(&[u8], bool); 6] = [
        (pki.ca_cert_pem.as_bytes(), false),
        (pki.ca_key_pem.expose(), true),
        (pki.server().cert_pem.as_bytes(), false),
        (pki.server().key_pem.expose(), true),
        (client.cert_pem.as_bytes(), false),
        (client.key_pem.expose(), true),
    ];
    for (path, (bytes, private)) in paths.iter().zip(contents) {
        write_new(path, bytes, if private { 0o600 } else { 0o644 })?;
    }
    Ok(paths)
}

/// Creates `path` with `mode` (never replacing an existing file, even one created since the
/// check above) and writes `bytes`.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    let write_err = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source: std::io::Error| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                TlsError::Exists {
                    path: path.to_owned(),
                }
            } else {
                write_err(source)
            }
        })?;
    file.write_all(bytes).map_err(write_err)?;
    file.sync_all().map_err(write_err)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::tls::PeerIdentity;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn writes_six_files_with_private_keys_0600() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        let files = write_dev_certs(&out, None).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, FILES);
        for path in &files {
            let name = path.file_name().unwrap().to_str().unwrap();
            if name.ends_with("-key.pem") {
                assert_eq!(mode(path), 0o600, "{name}");
            } else {
                // The umask may clear bits of 0644 but never adds any.
                assert_eq!(mode(path) & !0o644, 0, "{name}");
            }
        }
        let key = std::fs::read_to_string(out.join("client-key.pem")).unwrap();
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
        let client_pem = std::fs::read(out.join("client.pem")).unwrap();
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(&client_pem)
            .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
            .unwrap();
        assert!(PeerIdentity::from_der(&der)
            .unwrap()
            .has_san(DEFAULT_CLIENT_SAN));
        // The written files load as a working server config with mTLS.
        crate::tls::server_config(
            &out.join("server.pem"),
            &out.join("server-key.pem"),
            Some(&out.join("ca.pem")),
        )
        .unwrap();
    }

    #[test]
    fn custom_client_san() {
        let dir = tempfile::tempdir().unwrap();
        write_dev_certs(dir.path(), Some("spiffe://acme.example/bot")).unwrap();
        let pem = std::fs::read(dir.path().join("client.pem")).unwrap();
        let der: rustls::pki_types::CertificateDer<'static> =
            rustls::pki_types::pem::PemObject::from_pem_slice(&pem).unwrap();
        assert!(PeerIdentity::from_der(&der)
            .unwrap()
            .has_san("spiffe://acme.example/bot"));
    }

    #[test]
    fn a_client_san_that_is_neither_uri_nor_host_name_is_refused_before_anything_is_written() {
        for bad in [
            "DNS:not a uri",
            "not a host",
            "-bad.example",
            "a..b",
            "1nvalid scheme:x",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let err = write_dev_certs(dir.path(), Some(bad)).unwrap_err();
            assert!(matches!(err, TlsError::InvalidSan(_)), "{bad}: {err}");
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        write_dev_certs(dir.path(), Some("bot.acme.example")).unwrap();
    }

    #[test]
    fn refuses_to_overwrite_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("client-key.pem"), b"keep me").unwrap();
        let err = write_dev_certs(dir.path(), None).unwrap_err();
        assert!(matches!(err, TlsError::Exists { ref path } if path.ends_with("client-key.pem")));
        assert!(!dir.path().join("ca.pem").exists());
        assert_eq!(
            std::fs::read(dir.path().join("client-key.pem")).unwrap(),
            b"keep me"
        );

        let fresh = tempfile::tempdir().unwrap();
        write_dev_certs(fresh.path(), None).unwrap();
        let before = std::fs::read(fresh.path().join("ca-key.pem")).unwrap();
        assert!(matches!(
            write_dev_certs(fresh.path(), None),
            Err(TlsError::Exists { .. })
        ));
        assert_eq!(
            std::fs::read(fresh.path().join("ca-key.pem")).unwrap(),
            before
        );
    }
}
