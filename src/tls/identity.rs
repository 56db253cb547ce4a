//! The identity of a client that presented a verified certificate (RFC 8705): its SANs, for
//! `tls_client_auth` against a client's `cert_san`, and its SHA-256 thumbprint, for the token's
//! `cnf: {"x5t#S256": …}` binding (DESIGN §4.1, §4.2).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rustls::ServerConnection;
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;

use super::TlsError;

/// What the broker needs to know about a verified client certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// base64url (no padding) of SHA-256 over the certificate's DER: RFC 8705 `x5t#S256`.
    pub x5t_s256: String,
    /// The certificate's URI and DNS subject alternative names, in certificate order.
    pub sans: Vec<String>,
    /// The certificate's validity period (Unix seconds, inclusive). The handshake checked it
    /// then; a connection that outlives `not_after` no longer presents a valid certificate.
    pub not_before: i64,
    pub not_after: i64,
    /// The `client_ca` the handshake verified the certificate against ([`PeerIdentity::counts`]).
    pub verified_under: Option<ClientCaId>,
}

/// What identifies a `client_ca` file's contents: SHA-256 of its bytes. A reload that puts
/// other CA certificates in force changes it; one that re-reads the same file does not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientCaId(pub [u8; 32]);

impl ClientCaId {
    /// The id of a `client_ca` file holding `pem`.
    pub fn of(pem: &[u8]) -> Self {
        Self(Sha256::digest(pem).into())
    }
}

impl PeerIdentity {
    /// Parses a DER certificate. Only the SANs are read; trust was decided by the TLS verifier.
    pub fn from_der(der: &[u8]) -> Result<Self, TlsError> {
        let (rest, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
        if !rest.is_empty() {
            return Err(TlsError::BadCertificate(
                "trailing bytes after the certificate".into(),
            ));
        }
        let san = cert
            .subject_alternative_name()
            .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
        let sans = san
            .map(|ext| {
                ext.value
                    .general_names
                    .iter()
                    // A URI has a scheme, so a `:`; a DNS name never has one. A name of the
                    // other shape is malformed and left out, so that a `cert_san` matches only
                    // the kind of name it is: a CA that lets holders pick DNS names must not
                    // hand out a client's `spiffe://…` identity that way.
                    .filter_map(|name| match name {
                        GeneralName::URI(s) if s.contains(':') => Some((*s).to_owned()),
                        GeneralName::DNSName(s) if !s.contains(':') => Some((*s).to_owned()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let validity = cert.validity();
        Ok(Self {
            x5t_s256: x5t_s256(der),
            sans,
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
            verified_under: None,
        })
    }

    /// Whether the certificate still identifies the connection's client at `now` (Unix
    /// seconds), with `in_force` the listener's `client_ca` now: the handshake's verdict holds
    /// only within the certificate's validity period and under the CA it was verified against.
    /// A connection kept open past either — a certificate expired, a CA withdrawn by a reload
    /// — presents no certificate any more: its client reconnects, and the handshake decides
    /// again (DESIGN §4.1: the certificate authenticates the client, not the connection).
    pub fn counts(&self, now: i64, in_force: Option<ClientCaId>) -> bool {
        (self.not_before..=self.not_after).contains(&now)
            && self.verified_under.is_some()
            && self.verified_under == in_force
    }

    /// True if a SAN of the kind `cert_san` is names it: a URI (it has a `:`) byte for byte —
    /// a SPIFFE ID's path is case-sensitive, and the configured value is what the operator
    /// wrote —, a DNS name ignoring ASCII case, as DNS names compare (RFC 4343; a CA may
    /// write `Bot.Example` for `bot.example`).
    pub fn has_san(&self, cert_san: &str) -> bool {
        let dns = !cert_san.contains(':');
        self.sans.iter().any(|san| {
            san == cert_san || (dns && !san.contains(':') && san.eq_ignore_ascii_case(cert_san))
        })
    }
}

/// base64url (no padding) of SHA-256(`der`): the RFC 8705 `x5t#S256` certificate thumbprint.
pub fn x5t_s256(der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(der))
}

/// From an accepted rustls server connection: the leaf client certificate, if one was presented,
/// verified under the `client_ca` identified by `client_ca`.
///
/// rustls only exposes peer certificates that passed the client verifier, so a `Some` here is a
/// certificate chaining to `client_ca`.
pub fn peer_identity(
    conn: &ServerConnection,
    client_ca: Option<ClientCaId>,
) -> Option<PeerIdentity> {
    let leaf = conn.peer_certificates()?.first()?;
    match PeerIdentity::from_der(leaf) {
        Ok(identity) => Some(PeerIdentity {
            verified_under: client_ca,
            ..identity
        }),
        Err(error) => {
            // webpki accepted it, so this is unexpected; treat the peer as unauthenticated.
            tracing::warn!(%error, "verified client certificate could not be parsed");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::generate_dev_pki;

    #[test]
    fn thumbprint_is_base64url_sha256_of_der() {
        let der = b"not really a certificate";
        let expected = URL_SAFE_NO_PAD.encode(Sha256::digest(der));
        assert_eq!(x5t_s256(der), expected);
        assert_eq!(x5t_s256(der).len(), 43);
        assert!(!x5t_s256(der).contains(['=', '+', '/']));
    }

    #[test]
    fn from_der_reads_uri_and_dns_sans() {
        let pki = generate_dev_pki(&["spiffe://acme.example/bot", "bot.acme.example"]).unwrap();
        let uri =
            PeerIdentity::from_der(&pki.client("spiffe://acme.example/bot").unwrap().cert_der)
                .unwrap();
        assert_eq!(uri.sans, vec!["spiffe://acme.example/bot".to_owned()]);
        assert!(uri.has_san("spiffe://acme.example/bot"));
        assert!(!uri.has_san("spiffe://acme.example/Bot"));
        assert!(!uri.has_san("spiffe://acme.example/bot/"));
        assert!(!uri.has_san("spiffe://acme.example"));

        let dns = pki.client("bot.acme.example").unwrap();
        let dns_id = PeerIdentity::from_der(&dns.cert_der).unwrap();
        assert!(dns_id.has_san("bot.acme.example"));
        // DNS names compare without case (RFC 4343); a URI never matches a DNS name.
        assert!(dns_id.has_san("Bot.ACME.example"));
        assert!(!dns_id.has_san("bot.acme.example."));
        assert!(!uri.has_san("bot.acme.example"));
        assert_eq!(dns_id.x5t_s256, x5t_s256(&dns.cert_der));
        assert_ne!(dns_id.x5t_s256, uri.x5t_s256);
    }

    #[test]
    fn a_certificate_counts_within_its_validity_and_under_its_own_ca() {
        let mut params = rcgen::CertificateParams::default();
        params.not_before = rcgen::date_time_ymd(2026, 1, 1);
        params.not_after = rcgen::date_time_ymd(2026, 2, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let ca = ClientCaId::of(b"ca one");
        let id = PeerIdentity {
            verified_under: Some(ca),
            ..PeerIdentity::from_der(cert.der()).unwrap()
        };
        let (from, to) = (1_767_225_600, 1_769_904_000); // 2026-01-01, 2026-02-01 UTC
        assert_eq!((id.not_before, id.not_after), (from, to));
        for now in [from, from + 86_400, to] {
            assert!(id.counts(now, Some(ca)), "{now}");
        }
        // Expired, not yet valid, another CA in force, no CA in force.
        assert!(!id.counts(to + 1, Some(ca)));
        assert!(!id.counts(from - 1, Some(ca)));
        assert!(!id.counts(from + 1, Some(ClientCaId::of(b"ca two"))));
        assert!(!id.counts(from + 1, None));
        // Verified under no known CA (never the case for an accepted certificate): never.
        let unknown = PeerIdentity {
            verified_under: None,
            ..id
        };
        assert!(!unknown.counts(from + 1, None));
    }

    #[test]
    fn a_dns_name_shaped_like_a_uri_is_no_uri_identity() {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![
            rcgen::SanType::DnsName("spiffe://acme.example/bot".try_into().unwrap()),
            rcgen::SanType::URI("bot.acme.example".try_into().unwrap()),
            rcgen::SanType::DnsName("ok.acme.example".try_into().unwrap()),
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let id = PeerIdentity::from_der(cert.der()).unwrap();
        assert!(!id.has_san("spiffe://acme.example/bot"));
        assert!(!id.has_san("bot.acme.example"));
        assert_eq!(id.sans, vec!["ok.acme.example".to_owned()]);
    }

    #[test]
    fn server_cert_sans_exclude_ip_addresses() {
        let pki = generate_dev_pki(&[]).unwrap();
        let id = PeerIdentity::from_der(&pki.server().cert_der).unwrap();
        assert_eq!(id.sans, vec!["localhost".to_owned()]);
    }

    #[test]
    fn from_der_rejects_garbage_and_trailing_bytes() {
        assert!(matches!(
            PeerIdentity::from_der(b"\x30\x03abc"),
            Err(TlsError::BadCertificate(_))
        ));
        let pki = generate_dev_pki(&[]).unwrap();
        let mut der = pki.server().cert_der.clone();
        der.push(0);
        assert!(matches!(
            PeerIdentity::from_der(&der),
            Err(TlsError::BadCertificate(_))
        ));
    }
}
