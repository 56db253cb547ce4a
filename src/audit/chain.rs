//! The hash chain of DESIGN §5, as pure functions shared by the writer, start-up recovery and
//! `audit verify`: [`seal`] turns a record into its line, [`check_line`] re-computes a line's
//! hash and checks its link.
//!
//! A line is `{"seq":…,"ts":"…","event":"…",<fields>,"prev":"…","hash":"…"}`. B is the line
//! with its final `,"hash":"<hex>"}` replaced by `}`; `hash = hex(SHA-256(B))`, or
//! `hex(HMAC-SHA256(key, B))` with a key.

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::audit::record::Record;
use crate::secret::Secret;

/// `prev` of the first record ever.
pub const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Hex digits in a hash (SHA-256 and HMAC-SHA256 both give 32 bytes).
const HASH_HEX_LEN: usize = 64;
/// What precedes the hash value at the end of a line.
const HASH_MEMBER: &[u8] = b",\"hash\":\"";
/// Bytes from the start of `,"hash":"` to the end of the line.
const SUFFIX_LEN: usize = HASH_MEMBER.len() + HASH_HEX_LEN + 2;

/// Why a line does not belong in the chain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// The line is not a JSON object with `seq`, `ts`, `prev` and `hash`.
    #[error("unparsable line: {0}")]
    Unparsable(String),
    /// `hash` is not the last member, or is not 64 lowercase hex digits.
    #[error("`hash` is not the line's last member or is not 64 lowercase hex digits")]
    HashNotLast,
    /// The hash re-computed over B differs from the stored one (changed bytes, or a wrong key).
    #[error("hash mismatch: the record was changed (or the key is wrong)")]
    HashMismatch,
    /// `seq` is 2^63 or more: a crafted line, counting on from which would wrap.
    #[error("seq is implausibly large (2^63 or more): counting on from it would wrap")]
    SeqExhausted,
    /// `prev` is not the previous record's hash.
    #[error("broken link: prev {found} but the previous record's hash is {expected}")]
    BrokenLink {
        /// The previous record's hash.
        expected: String,
        /// The `prev` found on this line.
        found: String,
    },
}

/// The parts of a checked line that the next line's check needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    /// The line's `seq`.
    pub seq: u64,
    /// The line's `prev`.
    pub prev: String,
    /// The line's (verified) hash.
    pub hash: String,
}

/// The members `check_line` reads; borrowed so checking allocates little.
#[derive(Deserialize)]
struct Links<'a> {
    seq: u64,
    #[serde(borrow)]
    prev: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    hash: std::borrow::Cow<'a, str>,
}

/// A record's `ts` text: RFC 3339, UTC, microseconds, `Z` (`2026-11-26T05:03:25.123456Z`),
/// built on the stack: the writer makes one per record.
pub struct Ts {
    buf: [u8; 40],
    len: usize,
}

impl Ts {
    pub fn new(t: DateTime<Utc>) -> Self {
        use chrono::{Datelike, Timelike};
        let mut ts = Self {
            buf: [0; 40],
            len: 0,
        };
        let year = t.year();
        // A leap second (nanoseconds past 1e9) or a year outside four digits: chrono's own
        // formatting, which handles both (neither comes from a system clock in practice).
        if !(0..=9999).contains(&year) || t.nanosecond() >= 1_000_000_000 {
            let text = t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            let n = text.len().min(ts.buf.len());
            ts.buf[..n].copy_from_slice(&text.as_bytes()[..n]);
            ts.len = n;
            return ts;
        }
        let fields: [(u32, usize, u8); 7] = [
            (year as u32, 4, b'-'),
            (t.month(), 2, b'-'),
            (t.day(), 2, b'T'),
            (t.hour(), 2, b':'),
            (t.minute(), 2, b':'),
            (t.second(), 2, b'.'),
            (t.nanosecond() / 1_000, 6, b'Z'),
        ];
        let mut at = 0;
        for (value, width, after) in fields {
            let mut v = value;
            for i in (0..width).rev() {
                ts.buf[at + i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
            ts.buf[at + width] = after;
            at += width + 1;
        }
        ts.len = at;
        ts
    }

    pub fn as_str(&self) -> &str {
        // Digits and ASCII separators, or chrono's (UTF-8) text.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Length of `YYYY-MM-DDTHH:MM:SS.`, the part of a [`Ts`] that changes once a second.
const TS_SECOND_LEN: usize = 20;
/// Length of a [`Ts`] made by [`Ts::new`]'s own formatting (a four-digit year).
const TS_LEN: usize = TS_SECOND_LEN + 7;

/// Makes the `ts` of a run of records: the date and time to the second are kept from the
/// previous record of the same second (under load, nearly every one), and only the
/// microseconds are written. The text is [`Ts::new`]'s.
#[derive(Default)]
pub struct TsFormatter {
    second: Option<i64>,
    prefix: [u8; TS_SECOND_LEN],
}

impl TsFormatter {
    pub fn format(&mut self, t: DateTime<Utc>) -> Ts {
        let nanos = t.timestamp_subsec_nanos();
        // A leap second's nanoseconds run past 1e9 within the same second: Ts::new's care.
        if self.second == Some(t.timestamp()) && nanos < 1_000_000_000 {
            let mut ts = Ts {
                buf: [0; 40],
                len: TS_LEN,
            };
            ts.buf[..TS_SECOND_LEN].copy_from_slice(&self.prefix);
            let mut micros = nanos / 1_000;
            for at in (TS_SECOND_LEN..TS_LEN - 1).rev() {
                ts.buf[at] = b'0' + (micros % 10) as u8;
                micros /= 10;
            }
            ts.buf[TS_LEN - 1] = b'Z';
            return ts;
        }
        let ts = Ts::new(t);
        self.second = None;
        if ts.len == TS_LEN && nanos < 1_000_000_000 {
            self.prefix.copy_from_slice(&ts.buf[..TS_SECOND_LEN]);
            self.second = Some(t.timestamp());
        }
        ts
    }
}

/// A hash as 64 lower-case hex digits, on the stack.
#[derive(Clone, Copy)]
pub struct HashHex([u8; HASH_HEX_LEN]);

impl HashHex {
    pub fn as_str(&self) -> &str {
        // Hex digits are ASCII.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Seals a record: returns its line (without `\n`) and its hash.
pub fn seal(
    seq: u64,
    ts: &str,
    record: &Record,
    prev: &str,
    key: Option<&Secret>,
) -> Result<(String, String), ChainError> {
    let mut buf = Vec::with_capacity(256);
    let hash = seal_into(&mut buf, seq, ts.as_bytes(), record, prev.as_bytes(), key);
    // The line is built from JSON serialisation and hex digits only, so it is UTF-8.
    let line = String::from_utf8(buf).map_err(|e| ChainError::Unparsable(e.to_string()))?;
    Ok((line, hash.as_str().to_owned()))
}

/// Appends the sealed line (without `\n`) to `buf` and returns its hash. The writer uses this
/// to build one batch in one buffer. `ts` and `prev` are ASCII text ([`Ts`], a hash's hex),
/// taken as bytes: the writer has them as bytes.
pub fn seal_into(
    buf: &mut Vec<u8>,
    seq: u64,
    ts: &[u8],
    record: &Record,
    prev: &[u8],
    key: Option<&Secret>,
) -> HashHex {
    let start = buf.len();
    buf.extend_from_slice(b"{\"seq\":");
    buf.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    buf.extend_from_slice(b",\"ts\":\"");
    buf.extend_from_slice(ts);
    buf.push(b'"');
    super::encode::write_members(record, buf);
    buf.extend_from_slice(b",\"prev\":\"");
    buf.extend_from_slice(prev);
    buf.extend_from_slice(b"\"}");
    let hash = digest(key, &buf[start..]);
    buf.pop();
    buf.extend_from_slice(HASH_MEMBER);
    buf.extend_from_slice(&hash.0);
    buf.extend_from_slice(b"\"}");
    hash
}

/// Checks one line (without `\n`): it parses, `hash` is last and re-computes, and, when
/// `expected_prev` is given, `prev` equals it. Sequence numbers are the caller's business.
pub fn check_line(
    line: &[u8],
    expected_prev: Option<&str>,
    key: Option<&Secret>,
) -> Result<Checked, ChainError> {
    let links: Links<'_> =
        serde_json::from_slice(line).map_err(|e| ChainError::Unparsable(e.to_string()))?;
    let body = hashed_bytes(line, &links.hash)?;
    let computed = digest_parts(key, body, b"}");
    if !bool::from(computed.0[..].ct_eq(links.hash.as_bytes())) {
        return Err(ChainError::HashMismatch);
    }
    if let Some(expected) = expected_prev {
        if links.prev != expected {
            return Err(ChainError::BrokenLink {
                expected: expected.to_owned(),
                found: links.prev.into_owned(),
            });
        }
    }
    Ok(Checked {
        seq: links.seq,
        prev: links.prev.into_owned(),
        hash: links.hash.into_owned(),
    })
}

/// The part of B before its closing `}`: the line up to `,"hash":"`, after checking that the
/// line ends with exactly `,"hash":"<hash>"}`.
fn hashed_bytes<'l>(line: &'l [u8], hash: &str) -> Result<&'l [u8], ChainError> {
    let well_formed = hash.len() == HASH_HEX_LEN
        && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && line.len() > SUFFIX_LEN;
    if !well_formed {
        return Err(ChainError::HashNotLast);
    }
    let (body, suffix) = line.split_at(line.len() - SUFFIX_LEN);
    let expected_suffix = [HASH_MEMBER, hash.as_bytes(), b"\"}"].concat();
    if suffix != expected_suffix.as_slice() {
        return Err(ChainError::HashNotLast);
    }
    Ok(body)
}

/// `hex(SHA-256(b))` or `hex(HMAC-SHA256(key, b))`.
fn digest(key: Option<&Secret>, b: &[u8]) -> HashHex {
    digest_parts(key, b, b"")
}

/// The digest of `a ‖ b`, so B need not be copied to replace the hash member by `}`.
fn digest_parts(key: Option<&Secret>, a: &[u8], b: &[u8]) -> HashHex {
    match key {
        None => {
            let mut h = Sha256::new();
            h.update(a);
            h.update(b);
            hex_lower(&h.finalize().into())
        }
        Some(key) => {
            // HMAC accepts keys of any length, so this cannot fail.
            let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key.expose())
                .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
            m.update(a);
            m.update(b);
            hex_lower(&m.finalize().into_bytes().into())
        }
    }
}

/// Lower-case hex of a 32-byte digest, on the stack, a nibble at a time from a table (this
/// runs twice per proxied call: `hex::encode_to_slice` cost twice as much).
fn hex_lower(digest: &[u8; 32]) -> HashHex {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; HASH_HEX_LEN];
    for (pair, &byte) in buf.chunks_exact_mut(2).zip(digest) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0x0f)];
    }
    HashHex(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_lower_case_hex() {
        let digest: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ 0xa5);
        assert_eq!(hex_lower(&digest).as_str(), hex::encode(digest));
    }

    #[test]
    fn the_formatter_writes_what_ts_new_writes() {
        use chrono::TimeZone;
        let mut f = TsFormatter::default();
        let base = Utc.with_ymd_and_hms(2026, 12, 31, 23, 59, 58).unwrap();
        let mut times: Vec<DateTime<Utc>> =
            [0, 7, 999_999, 1_000_000, 1_000_001, 1_999_999, 2_000_000]
                .iter()
                .map(|&us| base + chrono::TimeDelta::microseconds(us))
                .collect();
        // A leap second (nanoseconds past 1e9) and the same second after it.
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_micro_opt(23, 59, 59, 1_500_000)
            .unwrap()
            .and_utc();
        times.extend([leap - chrono::TimeDelta::milliseconds(600), leap, leap]);
        times.push(Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).unwrap());
        times.push(base);
        for t in times {
            assert_eq!(f.format(t).as_str(), Ts::new(t).as_str(), "{t:?}");
        }
    }
    use crate::audit::record::{Decision, Event};

    fn sample() -> Record {
        let mut r = Record::new(Event::Proxy);
        r.client = Some("bot \"q\"".into());
        r.decision = Some(Decision::Allow);
        r
    }

    #[test]
    fn seal_layout_and_independent_hash() {
        let ts = "2026-11-26T05:03:25.123456Z";
        let (line, hash) = seal(1, ts, &sample(), ZERO_HASH, None).unwrap();
        let b = format!(
            "{{\"seq\":1,\"ts\":\"{ts}\",\"event\":\"proxy\",\"client\":\"bot \\\"q\\\"\",\"decision\":\"allow\",\"prev\":\"{ZERO_HASH}\"}}"
        );
        assert_eq!(line, format!("{},\"hash\":\"{hash}\"}}", &b[..b.len() - 1]));
        assert_eq!(hash, hex::encode(Sha256::digest(b.as_bytes())));
        let checked = check_line(line.as_bytes(), Some(ZERO_HASH), None).unwrap();
        assert_eq!(checked.seq, 1);
        assert_eq!(checked.hash, hash);
    }

    #[test]
    fn keyed_chain_needs_the_key() {
        let key = Secret::new("k1");
        let (line, hash) = seal(3, "t", &sample(), ZERO_HASH, Some(&key)).unwrap();
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(b"k1").unwrap();
        let b = format!("{}}}", &line[..line.len() - SUFFIX_LEN]);
        m.update(b.as_bytes());
        assert_eq!(hash, hex::encode(m.finalize().into_bytes()));
        assert!(check_line(line.as_bytes(), None, Some(&key)).is_ok());
        assert!(matches!(
            check_line(line.as_bytes(), None, None),
            Err(ChainError::HashMismatch)
        ));
        assert!(matches!(
            check_line(line.as_bytes(), None, Some(&Secret::new("k2"))),
            Err(ChainError::HashMismatch)
        ));
    }

    #[test]
    fn check_line_rejects_changes_links_and_layout() {
        let (line, _) = seal(1, "t", &sample(), ZERO_HASH, None).unwrap();
        let changed = line.replace("allow", "deny");
        assert!(matches!(
            check_line(changed.as_bytes(), None, None),
            Err(ChainError::HashMismatch)
        ));
        assert!(matches!(
            check_line(line.as_bytes(), Some(&"1".repeat(64)), None),
            Err(ChainError::BrokenLink { .. })
        ));
        assert!(matches!(
            check_line(b"{\"seq\":1", None, None),
            Err(ChainError::Unparsable(_))
        ));
        // A member after `hash` breaks the rule even if the JSON is fine.
        let moved = format!("{},\"x\":1}}", &line[..line.len() - 1]);
        assert!(matches!(
            check_line(moved.as_bytes(), None, None),
            Err(ChainError::HashNotLast)
        ));
    }

    #[test]
    fn timestamps_have_microseconds() {
        let t = DateTime::parse_from_rfc3339("2026-11-26T05:03:25.123456789Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(Ts::new(t).as_str(), "2026-11-26T05:03:25.123456Z");
    }

    proptest::proptest! {
        /// The stack-built `ts` is chrono's RFC 3339 text with microseconds, for any instant
        /// from year 0 to 9999 and beyond (where chrono's own formatting takes over).
        #[test]
        fn ts_text_is_chronos(secs in -62_200_000_000i64..260_000_000_000i64, nanos in 0u32..1_000_000_000) {
            let t = DateTime::from_timestamp(secs, nanos).unwrap();
            let expected = t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            let ts = Ts::new(t);
            proptest::prop_assert_eq!(ts.as_str(), expected.as_str());
        }
    }
}
