//! Tokens and credentials kept out of what the broker forwards and records: the copies of
//! the presented token that check 1 refuses (DESIGN §4.3, "the token only in that header"),
//! and the recorded fields' redaction — `access_token` values, the injected credential
//! parameter, anything shaped like a JWT (DESIGN §5: "a token, secret or credential never
//! appears in a record").

use http::header::AUTHORIZATION;
use http::{Method, Uri};

use super::canonical;

/// Shorter "tokens" are not looked for elsewhere in the request: a real one is hundreds of
/// bytes, and a few characters would turn up anywhere (such a token fails check 2 anyway).
const MIN_TOKEN_SEARCHED: usize = 32;

/// The tokens the request presents, to look for elsewhere in it: every piece of every
/// `Authorization` value long enough to be one, whatever the scheme or spacing (a malformed
/// header is refused by check 2, but the copy must not reach its record either).
pub(super) fn presented_tokens(headers: &http::HeaderMap) -> impl Iterator<Item = &str> {
    headers.get_all(AUTHORIZATION).iter().flat_map(|value| {
        let bytes = value.as_bytes();
        // This runs twice on every call, over a token of hundreds of bytes: the usual
        // `Bearer <token>` is told by a vectorised search for the separators; anything else
        // is split piece by piece.
        let usual = usual_bearer(bytes);
        let other = usual
            .is_none()
            .then(|| bytes.split(is_separator))
            .into_iter()
            .flatten();
        usual
            .into_iter()
            .chain(other)
            .filter(|piece| piece.len() >= MIN_TOKEN_SEARCHED)
            .filter_map(|piece| std::str::from_utf8(piece).ok())
    })
}

/// What separates the pieces of an `Authorization` value for [`presented_tokens`].
fn is_separator(b: &u8) -> bool {
    matches!(b, b' ' | b'\t' | b':' | b',')
}

/// The token of `Bearer <token>` with one space and no other separator.
fn usual_bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(7)?;
    let clean = scheme.eq_ignore_ascii_case(b"bearer ")
        && memchr::memchr3(b' ', b'\t', b',', token).is_none()
        && memchr::memchr(b':', token).is_none();
    clean.then_some(token)
}

/// Check 1, "the token only in that header": a copy of it in the method, the path or the query
/// (as sent or percent-decoded, as an upstream would read them) or in another header would
/// reach the upstream, and the audit record. Only text at least as long as the token is
/// searched (lengths first: a searcher for a long token is not free to build), so a usual
/// call costs a few length comparisons.
pub(super) fn token_copied_elsewhere(
    method: &Method,
    uri: &Uri,
    headers: &http::HeaderMap,
    token: &str,
) -> bool {
    let target = uri.path_and_query().map_or("", |pq| pq.as_str());
    let method = method.as_str();
    (method.len() >= token.len() && method.contains(token))
        || (target.len() >= token.len() && holds_token(target, token))
        || headers.iter().any(|(name, value)| {
            name != AUTHORIZATION
                && value.len() >= token.len()
                && contains_bytes(value.as_bytes(), token.as_bytes())
        })
}

/// Whether `text` holds `token`, as it is or once its `%XX` escapes are decoded.
fn holds_token(text: &str, token: &str) -> bool {
    text.contains(token) || holds_encoded_token(text, token)
}

/// Whether `text` holds `token` once its `%XX` escapes are decoded (a malformed escape kept as
/// it is).
fn holds_encoded_token(text: &str, token: &str) -> bool {
    text.contains('%')
        && contains_bytes(
            &canonical::percent_decode_lossy(text.as_bytes()),
            token.as_bytes(),
        )
}

/// A linear-time search (a crafted header of near-copies cannot make it quadratic).
fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(haystack, needle).is_some()
}

/// Replaces every copy of `token` in a recorded field by `REDACTED`; a field that holds it
/// only percent-encoded is replaced whole.
pub(super) fn redact_token(field: &mut Option<String>, token: &str) {
    let Some(text) = field.as_mut().filter(|t| t.len() >= token.len()) else {
        return;
    };
    if text.contains(token) {
        *text = text.replace(token, "REDACTED");
    } else if holds_encoded_token(text, token) {
        *text = "REDACTED".to_owned();
    }
}

/// The query as recorded: `access_token` values ([`redact_query`]) and anything shaped like a
/// JWT ([`redact_jwt_shapes`]) replaced by `REDACTED`.
pub(super) fn recorded_query(query: &str) -> String {
    let mut recorded = Some(redact_query(query));
    redact_jwt_shapes(&mut recorded);
    recorded.unwrap_or_default()
}

/// Replaces whatever is shaped like a JWT — three base64url parts, the first two JSON objects
/// (`eyJ…`) — with `REDACTED`. The broker knows the token of `Authorization` (and looks for
/// copies of it), but one sent only in the path or query is refused before it is read as a
/// token: it must not reach the record either (DESIGN §5). One search for `eyJ` on every call.
pub(crate) fn redact_jwt_shapes(field: &mut Option<String>) {
    let Some(text) = field.as_mut() else {
        return;
    };
    let bytes = text.as_bytes();
    let mut out: Option<String> = None;
    let (mut from, mut copied) = (0, 0);
    while let Some(found) = memchr::memmem::find(&bytes[from..], b"eyJ") {
        let start = from + found;
        match jwt_shape_end(bytes, start) {
            Some(end) => {
                let out = out.get_or_insert_with(|| String::with_capacity(text.len()));
                out.push_str(&text[copied..start]);
                out.push_str("REDACTED");
                (from, copied) = (end, end);
            }
            None => from = start + 3,
        }
    }
    if let Some(mut out) = out {
        out.push_str(&text[copied..]);
        *text = out;
    }
}

/// The end of a JWT-shaped run starting at `start` (which holds `eyJ`), if it is one: a
/// header and a payload of at least 10 base64url characters each, the payload also `eyJ…`,
/// and a signature of at least 16.
fn jwt_shape_end(bytes: &[u8], start: usize) -> Option<usize> {
    let is_b64url = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_');
    let part = |at: usize| at + bytes[at..].iter().take_while(|b| is_b64url(b)).count();
    let header_end = part(start);
    if header_end - start < 10 || bytes.get(header_end) != Some(&b'.') {
        return None;
    }
    let payload = header_end + 1;
    let payload_end = part(payload);
    if payload_end - payload < 10
        || !bytes[payload..].starts_with(b"eyJ")
        || bytes.get(payload_end) != Some(&b'.')
    {
        return None;
    }
    let signature = payload_end + 1;
    let end = part(signature);
    (end - signature >= 16).then_some(end)
}

/// The query as recorded: an `access_token` value (a token sent where it must not be) is
/// replaced by `REDACTED`. Pieces are split on `&` and `;` and names compared the way
/// [`canonical::check_query`] finds them ([`canonical::names_param`]); a piece whose name is
/// only a form of `access_token` (`access_token[]`, or `access_token%3D<token>`, where the
/// token is in the name itself) is replaced whole.
pub fn redact_query(query: &str) -> String {
    redact_query_param(query, "access_token")
}

/// [`redact_query`] for the parameter `param` (its values, or whole pieces whose name is only
/// a form of it).
pub(super) fn redact_query_param(query: &str, param: &str) -> String {
    let mut out = String::with_capacity(query.len());
    let mut start = 0;
    for (i, c) in query
        .char_indices()
        .chain(std::iter::once((query.len(), '&')))
    {
        if c != '&' && c != ';' {
            continue;
        }
        let piece = &query[start..i];
        let name = piece.split_once('=').map_or(piece, |(n, _)| n);
        let exact = || {
            canonical::percent_decode(name)
                .is_some_and(|d| d.eq_ignore_ascii_case(param.as_bytes()))
        };
        if !canonical::names_param(name, param) || piece == name && exact() {
            out.push_str(piece);
        } else if exact() {
            out.push_str(name);
            out.push_str("=REDACTED");
        } else {
            out.push_str("REDACTED");
        }
        if i < query.len() {
            out.push(c);
        }
        start = i + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{presented_tokens, redact_query};

    #[test]
    fn jwt_shapes_are_redacted_wherever_they_stand() {
        use super::redact_jwt_shapes;
        let jwt = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJib3QifQ.c2lnbmF0dXJlLXNpZ25hdHVyZQ";
        let redacted = |s: &str| {
            let mut field = Some(s.to_owned());
            redact_jwt_shapes(&mut field);
            field.unwrap()
        };
        assert_eq!(
            redacted(&format!("/repos/{jwt}/issues")),
            "/repos/REDACTED/issues"
        );
        assert_eq!(
            redacted(&format!("token={jwt}&t={jwt}&page=2")),
            "token=REDACTED&t=REDACTED&page=2"
        );
        assert_eq!(redacted(jwt), "REDACTED");
        for kept in [
            "/repos/acme/widget/issues",
            "q=eyJ",
            "q=eyJhbGciOiJFZERTQSJ9",
            "q=eyJhbGciOiJFZERTQSJ9.notjson1234.c2lnbmF0dXJlLXNpZ25hdHVyZQ",
            "q=eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJib3QifQ.short",
            "v=1.2.3",
        ] {
            assert_eq!(redacted(kept), kept);
        }
        let mut none = None;
        redact_jwt_shapes(&mut none);
        assert_eq!(none, None);
    }

    #[test]
    fn every_long_piece_of_an_authorization_value_is_a_token_to_look_for() {
        let token = "t".repeat(40);
        for value in [
            format!("Bearer {token}"),
            format!("bearer {token}"),
            format!("Bearer\t{token}"),
            format!("Bearer  {token} "),
            format!("Bearer:{token}"),
            format!("DPoP {token}"),
        ] {
            let mut headers = http::HeaderMap::new();
            headers.insert(http::header::AUTHORIZATION, value.parse().unwrap());
            assert_eq!(
                presented_tokens(&headers).collect::<Vec<_>>(),
                [token.as_str()],
                "{value:?}"
            );
        }
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, "Bearer short".parse().unwrap());
        assert_eq!(
            presented_tokens(&headers).count(),
            0,
            "too short to look for"
        );
    }

    #[test]
    fn access_token_values_never_reach_the_record() {
        assert_eq!(
            redact_query("a=1&access_token=SECRET"),
            "a=1&access_token=REDACTED"
        );
        assert_eq!(
            redact_query("a=1;ACCESS_TOKEN=SECRET&b"),
            "a=1;ACCESS_TOKEN=REDACTED&b"
        );
        assert_eq!(
            redact_query("access%5Ftoken=SECRET"),
            "access%5Ftoken=REDACTED"
        );
        assert_eq!(redact_query("state=open&page=2"), "state=open&page=2");
        assert_eq!(redact_query("a=1&access_token[]=SECRET"), "a=1&REDACTED");
        assert_eq!(redact_query("access_token&b"), "access_token&b", "no value");
        assert_eq!(redact_query("access_token%3DSECRET;b=2"), "REDACTED;b=2");
        assert_eq!(
            redact_query("access_token_hint=x"),
            "access_token_hint=x",
            "another parameter"
        );
    }
}
