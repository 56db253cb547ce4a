//! Throwaway certificates for tests and development (`credbroker keygen dev-certs`): a CA, a
//! server certificate for the loopback names, and client certificates for mTLS, made with rcgen.
//! Never for production: the CA key sits next to the certificates it signs.

use std::fmt;

use chrono::{Datelike, Duration, Utc};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

use super::TlsError;
use crate::secret::Secret;

/// The names the dev server certificate is valid for.
const SERVER_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// How long dev certificates are valid; they start a day in the past to absorb clock skew.
const VALIDITY_DAYS: i64 = 365;

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The certificate, DER (what a TLS peer presents; its SHA-256 is the `x5t#S256`).
    pub cert_der: Vec<u8>,
    /// The private key, PKCS#8 PEM.
    pub key_pem: Secret,
}

/// Everything a test or a developer needs: a CA, a server certificate for
/// localhost/127.0.0.1/::1 signed by it, and client certificates signed by it.
pub struct DevPki {
    /// The CA certificate, PEM: the `client_ca` of the server, the `upstream_ca` of a connector.
    pub ca_cert_pem: String,
    /// The CA private key, PKCS#8 PEM.
    pub ca_key_pem: Secret,
    ca_cert: Certificate,
    ca_key: KeyPair,
    server: IssuedCert,
    clients: Vec<(String, IssuedCert)>,
}

impl DevPki {
    /// The server certificate for localhost, 127.0.0.1 and ::1.
    pub fn server(&self) -> &IssuedCert {
        &self.server
    }

    /// The client certificate made for `san`, if [`generate_dev_pki`] was asked for it.
    pub fn client(&self, san: &str) -> Option<&IssuedCert> {
        self.clients
            .iter()
            .find(|(name, _)| name == san)
            .map(|(_, cert)| cert)
    }

    /// A server certificate for an arbitrary host list (DNS names or IP addresses) signed by
    /// this CA, e.g. for a fake upstream.
    pub fn issue_server_cert(&self, hosts: &[&str]) -> Result<IssuedCert, TlsError> {
        let names = hosts.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>();
        let mut params =
            CertificateParams::new(names).map_err(|_| TlsError::InvalidSan(hosts.join(",")))?;
        params.distinguished_name.push(
            DnType::CommonName,
            hosts.first().copied().unwrap_or("server"),
        );
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate for mTLS: a URI SAN when `san` contains `:`, else a DNS SAN. A
    /// value that is neither a well-formed URI nor a host name is refused: a certificate
    /// whose SAN no `cert_san` could sensibly name would only puzzle later.
    fn issue_client_cert(&self, san: &str) -> Result<IssuedCert, TlsError> {
        let ia5 = || {
            san.try_into()
                .map_err(|_| TlsError::InvalidSan(san.to_owned()))
        };
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![if san.contains(':') {
            if !is_uri(san) {
                return Err(TlsError::InvalidSan(san.to_owned()));
            }
            SanType::URI(ia5()?)
        } else {
            if !is_dns_name(san) {
                return Err(TlsError::InvalidSan(san.to_owned()));
            }
            SanType::DnsName(ia5()?)
        }];
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, san);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    /// Signs `params` with the CA under a fresh key.
    fn issue(&self, mut params: CertificateParams) -> Result<IssuedCert, TlsError> {
        set_validity(&mut params);
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key)?;
        Ok(issued(&cert, &key))
    }
}

/// An absolute URI as a SAN holds one (RFC 3986 §3: `scheme:` and a non-empty rest, printable
/// ASCII without spaces).
fn is_uri(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once(':') else {
        return false;
    };
    let mut scheme_chars = scheme.chars();
    scheme_chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && scheme_chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        && !rest.is_empty()
        && rest.bytes().all(|b| b.is_ascii_graphic())
}

/// A host name: dot-separated labels of letters, digits and inner hyphens, 1–63 bytes each.
fn is_dns_name(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

impl fmt::Debug for DevPki {
    // By hand: rcgen's `KeyPair` Debug prints the private key bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevPki")
            .field("ca_cert_pem", &self.ca_cert_pem)
            .field("ca_key_pem", &self.ca_key_pem)
            .field("server", &self.server)
            .field("clients", &self.clients)
            .finish_non_exhaustive()
    }
}

/// Generates a CA, a server certificate for localhost/127.0.0.1/::1 and one client certificate
/// per entry of `client_sans` (a URI SAN if it contains `:`, else a DNS SAN), all in memory.
pub fn generate_dev_pki(client_sans: &[&str]) -> Result<DevPki, TlsError> {
    let ca_key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    // A random suffix keeps two dev CAs apart: a verifier picks the issuer by name, so two CAs
    // with one name would fail as a bad signature instead of an unknown issuer.
    let ca_name = format!("credbroker dev CA {:08x}", rand::random::<u32>());
    params.distinguished_name.push(DnType::CommonName, ca_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params);
    let ca_cert = params.self_signed(&ca_key)?;
    let ca = issued(&ca_cert, &ca_key);
    let mut pki = DevPki {
        ca_cert_pem: ca.cert_pem,
        ca_key_pem: ca.key_pem,
        ca_cert,
        ca_key,
        // Replaced just below; a CA-signed certificate needs the CA inside `DevPki` first.
        server: IssuedCert {
            cert_pem: String::new(),
            cert_der: Vec::new(),
            key_pem: Secret::new(Vec::new()),
        },
        clients: Vec::new(),
    };
    pki.server = pki.issue_server_cert(&SERVER_HOSTS)?;
    for san in client_sans {
        let cert = pki.issue_client_cert(san)?;
        pki.clients.push(((*san).to_owned(), cert));
    }
    Ok(pki)
}

fn issued(cert: &Certificate, key: &KeyPair) -> IssuedCert {
    IssuedCert {
        cert_pem: cert.pem(),
        cert_der: cert.der().to_vec(),
        key_pem: Secret::new(key.serialize_pem()),
    }
}

/// Valid from yesterday for [`VALIDITY_DAYS`].
fn set_validity(params: &mut CertificateParams) {
    let ymd = |t: chrono::DateTime<Utc>| {
        // Month and day always fit in u8 (1..=12, 1..=31).
        rcgen::date_time_ymd(t.year(), t.month() as u8, t.day() as u8)
    };
    let now = Utc::now();
    params.not_before = ymd(now - Duration::days(1));
    params.not_after = ymd(now + Duration::days(VALIDITY_DAYS));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::PeerIdentity;

    #[test]
    fn generates_ca_server_and_named_clients() {
        let pki = generate_dev_pki(&["spiffe://credbroker.dev/a", "b.example"]).unwrap();
        assert!(pki.ca_cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(std::str::from_utf8(pki.ca_key_pem.expose())
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(pki.client("spiffe://credbroker.dev/a").is_some());
        assert!(pki.client("b.example").is_some());
        assert!(pki.client("c.example").is_none());
        assert_ne!(
            pki.server().cert_der,
            pki.client("b.example").unwrap().cert_der
        );
    }

    #[test]
    fn issued_server_cert_carries_the_hosts() {
        let pki = generate_dev_pki(&[]).unwrap();
        let cert = pki
            .issue_server_cert(&["upstream.test", "10.0.0.1"])
            .unwrap();
        let id = PeerIdentity::from_der(&cert.cert_der).unwrap();
        assert_eq!(id.sans, vec!["upstream.test".to_owned()]);
    }

    #[test]
    fn non_ascii_san_is_refused() {
        assert!(matches!(
            generate_dev_pki(&["spiffe://ex.test/é"]),
            Err(TlsError::InvalidSan(_))
        ));
    }

    #[test]
    fn debug_hides_private_keys() {
        let pki = generate_dev_pki(&["x.example"]).unwrap();
        let shown = format!("{pki:?}");
        assert!(!shown.contains("PRIVATE KEY"));
        assert!(shown.contains("REDACTED"));
    }
}
