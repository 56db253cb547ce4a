//! `credbroker keygen`: signing keys, client secrets, development certificates.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum KeygenCommand {
    /// Write a new Ed25519 PKCS#8 PEM signing key (mode 0600), or print it without --out.
    SigningKey {
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print a new random client secret and the secret_sha256 line for the config.
    ClientSecret,
    /// Write a development CA, server certificate and client certificate (never for production).
    DevCerts {
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// The client certificate's URI SAN.
        #[arg(long)]
        client_san: Option<String>,
    },
}

/// Why a key file could not be created, in the words that tell the user what to change.
fn cannot_create(path: &std::path::Path, e: &std::io::Error) -> String {
    let path = path.display();
    match e.kind() {
        std::io::ErrorKind::AlreadyExists => {
            format!("{path} already exists: keygen never overwrites a key (remove it first)")
        }
        std::io::ErrorKind::NotFound => {
            format!("cannot create {path}: its folder does not exist")
        }
        _ => format!("cannot create {path}: {e}"),
    }
}

pub fn run(cmd: KeygenCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        KeygenCommand::SigningKey { out } => {
            let pem = crate::token::generate_signing_key_pem();
            match out {
                Some(path) => {
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&path)
                        .map_err(|e| anyhow::anyhow!("{}", cannot_create(&path, &e)))?;
                    f.write_all(pem.expose())?;
                    eprintln!("wrote {}", path.display());
                }
                None => std::io::stdout().write_all(pem.expose())?,
            }
        }
        KeygenCommand::ClientSecret => {
            let (secret, sha) = crate::token::generate_client_secret();
            // Standard output is what a script takes: the secret alone on the first line, the
            // config line on the second. What to do with them goes to standard error.
            eprintln!(
                "The client secret (first line: give it to the integration, it is not stored) \
                 and the line for the client's [[clients]] entry (second line):"
            );
            let mut out = std::io::stdout();
            out.write_all(secret.expose())?;
            writeln!(out, "\nsecret_sha256 = \"{sha}\"")?;
        }
        KeygenCommand::DevCerts { out, client_san } => {
            let files = super::keygen_certs::write_dev_certs(&out, client_san.as_deref())?;
            for f in files {
                println!("wrote {}", f.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
