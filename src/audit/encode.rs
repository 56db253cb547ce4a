//! A [`Record`]'s members as they appear on its line, written by hand.
//!
//! The writer seals one or two records per proxied call, and `serde_json`'s generic
//! machinery (a map state per member, a table lookup per byte) was its largest cost after the
//! chain hash (`benches/`'s callgrind profile: ~5.7k instructions a call for ~660 bytes).
//! [`write_members`] writes exactly the bytes `serde_json::to_writer` writes inside the
//! record's braces — a property test holds the two equal — with each member's key a literal
//! and clean text copied whole.

use super::record::Record;

/// Appends `record`'s members, each preceded by a comma (`,"event":"proxy","client":"bot",…`):
/// what `serde_json` writes between the object's braces, with the first brace's place taken
/// by the comma. Member order is [`Record`]'s field order; absent fields are left out.
pub(crate) fn write_members(record: &Record, out: &mut Vec<u8>) {
    macro_rules! text {
        ($name:literal, $value:expr) => {
            if let Some(value) = &$value {
                out.extend_from_slice(concat!(",\"", $name, "\":\"").as_bytes());
                escape_into(out, value);
                out.push(b'"');
            }
        };
    }
    macro_rules! number {
        ($name:literal, $value:expr) => {
            if let Some(value) = $value {
                out.extend_from_slice(concat!(",\"", $name, "\":").as_bytes());
                out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
            }
        };
    }
    out.extend_from_slice(b",\"event\":\"");
    out.extend_from_slice(record.event.as_str().as_bytes());
    out.push(b'"');
    text!("request_id", record.request_id);
    text!("client", record.client);
    text!("connector", record.connector);
    text!("operation", record.operation);
    text!("method", record.method);
    text!("path", record.path);
    text!("query", record.query);
    text!("jti", record.jti);
    text!("peer", record.peer);
    if let Some(decision) = record.decision {
        out.extend_from_slice(b",\"decision\":\"");
        out.extend_from_slice(decision.as_str().as_bytes());
        out.push(b'"');
    }
    text!("reason", record.reason);
    number!("status", record.status);
    text!("scope", record.scope);
    text!("expires_at", record.expires_at);
    text!("grant_reason", record.grant_reason);
    text!("grant_expires", record.grant_expires);
    number!("duration_ms", record.duration_ms);
    number!("bytes_in", record.bytes_in);
    number!("bytes_out", record.bytes_out);
    text!("upstream_request_id", record.upstream_request_id);
    text!("error", record.error);
    text!("action", record.action);
    text!("actor", record.actor);
    text!("target", record.target);
    text!("result", record.result);
    text!("kind", record.kind);
    text!("version", record.version);
    text!("config_sha256", record.config_sha256);
    number!("truncated_bytes", record.truncated_bytes);
    text!("replica", record.replica);
}

/// `text` as the inside of a JSON string, escaped as `serde_json` escapes it: `"` and `\`
/// with a backslash, `\b \t \n \f \r` short, other control characters as `\u00xx` (lower-case
/// hex), everything else — non-ASCII and DEL included — as it is.
fn escape_into(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    if !needs_escape(bytes) {
        out.extend_from_slice(bytes);
        return;
    }
    let mut copied = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            0x0c => b"\\f",
            b'\r' => b"\\r",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[copied..i]);
        if short.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(short);
        }
        copied = i + 1;
    }
    out.extend_from_slice(&bytes[copied..]);
}

/// Whether any byte of `bytes` is a control character, `"` or `\`: eight bytes at a time
/// (a record's fields are almost always clean, and mostly tens of bytes long).
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // The high bit of each byte of the result is set where `word`'s byte is below `n`
    // (exact for n <= 0x80: bytes >= 0x80, UTF-8's, are never flagged).
    let below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGHS;
    let any = |word: u64| {
        below(word, 0x20)
            | below(word ^ (ONES * u64::from(b'"')), 1)
            | below(word ^ (ONES * u64::from(b'\\')), 1)
            != 0
    };
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
        if any(word) {
            return true;
        }
    }
    chunks
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::audit::record::{Decision, Event};

    /// What `serde_json` writes inside the braces, with the first brace turned into a comma.
    fn by_serde(record: &Record) -> Vec<u8> {
        let mut json = serde_json::to_vec(record).unwrap();
        json[0] = b',';
        json.pop();
        json
    }

    fn by_hand(record: &Record) -> Vec<u8> {
        let mut out = Vec::new();
        write_members(record, &mut out);
        out
    }

    #[test]
    fn a_usual_record_is_written_as_serde_writes_it() {
        let mut r = Record::new(Event::Proxy);
        r.request_id = Some("0123456789abcdef".into());
        r.client = Some("bot".into());
        r.path = Some("/repos/acme/widget/issues".into());
        r.query = Some("q=\"a\\b\"\n\u{1}\u{7f}é".into());
        r.decision = Some(Decision::Allow);
        r.status = Some(403);
        r.bytes_out = Some(u64::MAX);
        assert_eq!(
            String::from_utf8(by_hand(&r)).unwrap(),
            String::from_utf8(by_serde(&r)).unwrap()
        );
        assert_eq!(
            by_hand(&Record::new(Event::Shutdown)),
            b",\"event\":\"shutdown\""
        );
    }

    #[test]
    fn every_control_character_and_each_position_in_a_word() {
        for b in 0u8..=0x7f {
            for at in 0..17 {
                let mut text = "x".repeat(17);
                text.replace_range(at..=at, char::from(b).encode_utf8(&mut [0; 4]));
                let mut r = Record::new(Event::Admin);
                r.target = Some(text);
                assert_eq!(by_hand(&r), by_serde(&r), "byte {b:#x} at {at}");
            }
        }
    }

    fn text() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(any::<String>())
    }

    fn number() -> impl Strategy<Value = Option<u64>> {
        proptest::option::of(any::<u64>())
    }

    prop_compose! {
        fn record()(
            texts in proptest::collection::vec(text(), 24),
            numbers in proptest::collection::vec(number(), 4),
            status in proptest::option::of(any::<u16>()),
            decision in proptest::option::of(prop_oneof![Just(Decision::Allow), Just(Decision::Deny)]),
            event in prop_oneof![
                Just(Event::TokenIssued),
                Just(Event::TokenDenied),
                Just(Event::Proxy),
                Just(Event::ProxyResult),
                Just(Event::Admin),
                Just(Event::CredentialRefreshed),
                Just(Event::Startup),
                Just(Event::Shutdown),
                Just(Event::Recovered),
            ],
        ) -> Record {
            let mut t = texts.into_iter();
            let mut n = numbers.into_iter();
            let mut next = || t.next().flatten();
            // Every field named (no `..Default`): a field added to `Record` fails to compile
            // here until `write_members` writes it too.
            Record {
                event,
                request_id: next(),
                client: next(),
                connector: next(),
                operation: next(),
                method: next(),
                path: next(),
                query: next(),
                jti: next(),
                peer: next(),
                decision,
                reason: next(),
                status,
                scope: next(),
                expires_at: next(),
                grant_reason: next(),
                grant_expires: next(),
                duration_ms: n.next().flatten(),
                bytes_in: n.next().flatten(),
                bytes_out: n.next().flatten(),
                upstream_request_id: next(),
                error: next(),
                action: next(),
                actor: next(),
                target: next(),
                result: next(),
                kind: next(),
                version: next(),
                config_sha256: next(),
                truncated_bytes: n.next().flatten(),
                replica: next(),
            }
        }
    }

    proptest! {
        #[test]
        fn any_record_is_written_as_serde_writes_it(r in record()) {
            prop_assert_eq!(by_hand(&r), by_serde(&r));
        }
    }
}
