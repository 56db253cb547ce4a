//! The token request body (DESIGN §4.1, `application/x-www-form-urlencoded`) and its
//! `authorization_details` parameter (RFC 9396).

use std::collections::HashSet;

use serde::Deserialize;

use crate::token::claims::AuthorizationDetail;

/// The only `authorization_details` type the broker understands.
const DETAIL_TYPE: &str = "credbroker_request";
/// More entries than this in one token request is abuse, not a use case.
const MAX_DETAILS: usize = 100;

/// Why the token request body (or its `authorization_details`) was refused; every variant
/// becomes `invalid_request`. Never contains a parameter value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormError {
    /// A parameter appears more than once (RFC 6749 §3.2). Unknown names are not echoed.
    #[error("parameter {0} is included more than once")]
    Repeated(&'static str),
    /// A `%` not followed by two hex digits.
    #[error("the request body has invalid percent-encoding")]
    BadEncoding,
    /// A name or value is not UTF-8 once decoded.
    #[error("the request body is not UTF-8")]
    NotUtf8,
    /// `authorization_details` is not a JSON array of `credbroker_request` objects.
    #[error("authorization_details is invalid: {0}")]
    BadAuthorizationDetails(&'static str),
}

/// The parameters of a token request, before any validation of their values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenForm {
    pub grant_type: Option<String>,
    pub scope: Option<String>,
    pub ttl: Option<String>,
    pub max_uses: Option<String>,
    pub authorization_details: Option<String>,
    pub client_id: Option<String>,
    /// `client_secret` was sent in the body (client_secret_post, not supported); its value
    /// is never decoded or kept.
    pub client_secret_present: bool,
}

/// The parameters we read, by name; anything else is ignored.
const KNOWN: [&str; 7] = [
    "grant_type",
    "scope",
    "ttl",
    "max_uses",
    "authorization_details",
    "client_id",
    "client_secret",
];

/// Parses the body; a repeated parameter the broker reads (RFC 6749 §3.2: must not be included
/// more than once), invalid percent-encoding or non-UTF-8 → FormError (→ invalid_request).
/// Unknown params are ignored, repeated or not.
/// `client_secret` in the body is only noted, never kept. An empty value counts as absent
/// (RFC 6749 §3.1), though it still counts towards repetition.
pub fn parse_token_form(body: &[u8]) -> Result<TokenForm, FormError> {
    let mut form = TokenForm::default();
    let mut seen: HashSet<&str> = HashSet::new();
    for pair in body.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        let (raw_name, raw_value) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &b""[..]),
        };
        let name = decode_utf8(raw_name)?;
        // Only the parameters read are held to "once": one the broker ignores may repeat
        // (RFC 8707 sends `resource` once per resource).
        let Some(known) = KNOWN.iter().copied().find(|k| *k == name) else {
            continue;
        };
        if !seen.insert(known) {
            return Err(FormError::Repeated(known));
        }
        if raw_value.is_empty() {
            continue;
        }
        if known == "client_secret" {
            // Deliberately not decoded: the value must not live anywhere in the broker.
            form.client_secret_present = true;
            continue;
        }
        let value = Some(decode_utf8(raw_value)?);
        match known {
            "grant_type" => form.grant_type = value,
            "scope" => form.scope = value,
            "ttl" => form.ttl = value,
            "max_uses" => form.max_uses = value,
            "authorization_details" => form.authorization_details = value,
            _ => form.client_id = value,
        }
    }
    Ok(form)
}

/// One `authorization_details` entry as sent; unknown members are refused because the
/// broker could not enforce them and the client would believe it had.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireDetail {
    #[serde(rename = "type")]
    kind: String,
    connector: String,
    method: String,
    path: String,
}

/// Parses `authorization_details` JSON (RFC 9396 array): each entry must have type
/// "credbroker_request", connector, method, path; anything else → error.
pub fn parse_authorization_details(json: &str) -> Result<Vec<AuthorizationDetail>, FormError> {
    let wire: Vec<WireDetail> = serde_json::from_str(json).map_err(|_| {
        FormError::BadAuthorizationDetails(
            "expected a JSON array of objects with exactly type, connector, method and path",
        )
    })?;
    if wire.is_empty() {
        return Err(FormError::BadAuthorizationDetails("the array is empty"));
    }
    if wire.len() > MAX_DETAILS {
        return Err(FormError::BadAuthorizationDetails("too many entries"));
    }
    wire.into_iter().map(validate_detail).collect()
}

fn validate_detail(d: WireDetail) -> Result<AuthorizationDetail, FormError> {
    if d.kind != DETAIL_TYPE {
        return Err(FormError::BadAuthorizationDetails(
            "type must be credbroker_request",
        ));
    }
    if d.connector.is_empty() || d.connector.contains('/') {
        return Err(FormError::BadAuthorizationDetails(
            "connector is not a name",
        ));
    }
    // An HTTP method is a token (RFC 9110 §9.1); we accept the usual upper-case ones.
    if d.method.is_empty() || !d.method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(FormError::BadAuthorizationDetails(
            "method must be an upper-case HTTP method",
        ));
    }
    if !d.path.starts_with('/') {
        return Err(FormError::BadAuthorizationDetails("path must start with /"));
    }
    Ok(AuthorizationDetail {
        kind: d.kind,
        connector: d.connector,
        method: d.method,
        path: d.path,
    })
}

/// Decodes one form-urlencoded name or value into a `String`.
fn decode_utf8(raw: &[u8]) -> Result<String, FormError> {
    let bytes = form_urldecode(raw).ok_or(FormError::BadEncoding)?;
    String::from_utf8(bytes).map_err(|_| FormError::NotUtf8)
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte. `None` on a
/// `%` without two hex digits (browsers pass those through; for a token request it is an
/// error, so nothing is guessed).
pub(crate) fn form_urldecode(raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = hex_digit(*raw.get(i + 1)?)?;
                let lo = hex_digit(*raw.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    Some(out)
}

fn hex_digit(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn parses_a_token_request() {
        let form = parse_token_form(
            b"grant_type=client_credentials&scope=github%3Aissues.read+slack:chat.post&ttl=60\
              &max_uses=1&client_id=bot&other=ignored",
        )
        .unwrap();
        assert_eq!(form.grant_type.as_deref(), Some("client_credentials"));
        assert_eq!(
            form.scope.as_deref(),
            Some("github:issues.read slack:chat.post")
        );
        assert_eq!(form.ttl.as_deref(), Some("60"));
        assert_eq!(form.max_uses.as_deref(), Some("1"));
        assert_eq!(form.client_id.as_deref(), Some("bot"));
        assert!(form.authorization_details.is_none());
        assert!(!form.client_secret_present);
    }

    #[test]
    fn repeated_parameters_are_refused() {
        assert_eq!(
            parse_token_form(b"scope=a:b&grant_type=client_credentials&scope=c:d"),
            Err(FormError::Repeated("scope"))
        );
        // Even when the repetition is hidden by encoding or an empty value.
        assert_eq!(
            parse_token_form(b"scope=a:b&sc%6Fpe="),
            Err(FormError::Repeated("scope"))
        );
        // A parameter the broker does not read may repeat (RFC 8707 `resource`).
        let form = parse_token_form(
            b"grant_type=client_credentials&resource=https%3A%2F%2Fa&resource=https%3A%2F%2Fb&scope=a:b",
        )
        .unwrap();
        assert_eq!(form.scope.as_deref(), Some("a:b"));
    }

    #[test]
    fn bad_encoding_is_refused() {
        assert_eq!(parse_token_form(b"scope=a%2"), Err(FormError::BadEncoding));
        assert_eq!(parse_token_form(b"scope=a%zz"), Err(FormError::BadEncoding));
        assert_eq!(parse_token_form(b"scope=%FF"), Err(FormError::NotUtf8));
        assert_eq!(parse_token_form(b"sc%FFope=x"), Err(FormError::NotUtf8));
    }

    #[test]
    fn client_secret_is_noted_not_kept() {
        let form =
            parse_token_form(b"client_secret=hunter2%ZZ&grant_type=client_credentials").unwrap();
        assert!(form.client_secret_present);
        assert!(!format!("{form:?}").contains("hunter2"));
        // An empty value is treated as omitted (RFC 6749 §3.1).
        assert!(
            !parse_token_form(b"client_secret=")
                .unwrap()
                .client_secret_present
        );
    }

    #[test]
    fn empty_values_and_pieces_are_absent() {
        let form = parse_token_form(b"&scope=&&grant_type&ttl=5&").unwrap();
        assert_eq!(form.scope, None);
        assert_eq!(form.grant_type, None);
        assert_eq!(form.ttl.as_deref(), Some("5"));
    }

    #[test]
    fn authorization_details_parse() {
        let details = parse_authorization_details(
            r#"[{"type":"credbroker_request","connector":"github","method":"GET","path":"/repos/acme/widget/issues"}]"#,
        )
        .unwrap();
        assert_eq!(
            details,
            vec![AuthorizationDetail {
                kind: "credbroker_request".to_owned(),
                connector: "github".to_owned(),
                method: "GET".to_owned(),
                path: "/repos/acme/widget/issues".to_owned(),
            }]
        );
    }

    #[test]
    fn bad_authorization_details_are_refused() {
        let ok = r#"{"type":"credbroker_request","connector":"github","method":"GET","path":"/x"}"#;
        for bad in [
            "".to_owned(),
            "[]".to_owned(),
            ok.to_owned(),
            format!(
                "[{}]",
                ok.replace("credbroker_request", "payment_initiation")
            ),
            format!("[{}]", ok.replace(r#","path":"/x""#, "")),
            format!("[{}]", ok.replace(r#""/x""#, r#""/x","locations":["a"]"#)),
            format!("[{}]", ok.replace("GET", "get")),
            format!("[{}]", ok.replace(r#""/x""#, r#""x""#)),
            format!("[{}]", ok.replace(r#""github""#, r#""""#)),
            format!("[{ok},7]"),
        ] {
            assert!(parse_authorization_details(&bad).is_err(), "{bad}");
        }
        let many = format!("[{}]", vec![ok; MAX_DETAILS + 1].join(","));
        assert!(parse_authorization_details(&many).is_err());
    }

    #[test]
    fn urldecode_handles_plus_and_escapes() {
        assert_eq!(form_urldecode(b"a+b%3A%3a%25").unwrap(), b"a b::%");
        assert!(form_urldecode(b"%").is_none());
        assert!(form_urldecode(b"%4").is_none());
        assert!(form_urldecode(b"%+1").is_none());
    }

    proptest! {
        /// Encoding any value and parsing it back gives the value; parsing never panics.
        #[test]
        fn value_round_trips(value in "\\PC{1,40}") {
            let encoded: String = value.bytes().map(|b| format!("%{b:02X}")).collect();
            let form = parse_token_form(format!("scope={encoded}").as_bytes()).unwrap();
            prop_assert_eq!(form.scope.as_deref(), Some(value.as_str()));
        }

        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_token_form(&body);
        }
    }
}
