//! Path patterns of connector operations (DESIGN §3.1): parsing into segments and a plain
//! segment-by-segment matcher that serves as the reference for the trie in [`super::router`].
//!
//! Grammar: a pattern is `/` or `/` followed by one or more non-empty segments separated by `/`.
//! A segment is a literal (matched byte for byte, case-sensitive, never decoded), `{name}`
//! (exactly one non-empty segment) or `{*name}` (last only: one or more segments).
//! A trailing `/` is refused (except the pattern `/` itself, which matches only the path `/`),
//! because the canonical path check refuses empty segments: such a pattern could never match.

use thiserror::Error;

/// Why a pattern was refused. Patterns come from the config file, so messages may quote them.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PatternError {
    /// The pattern does not start with `/`.
    #[error("pattern must start with '/'")]
    MissingLeadingSlash,
    /// The pattern has an empty segment: `//` or a trailing `/` (only `/` itself may end in `/`).
    #[error("pattern has an empty segment ('//' or a trailing '/')")]
    EmptySegment,
    /// A segment is `.` or `..`; such a segment is never canonical.
    #[error("pattern has a '.' or '..' segment")]
    DotSegment,
    /// A `{` or `}` appears that does not form a whole `{name}` or `{*name}` segment.
    #[error(
        "segment {segment:?}: braces must enclose a whole segment, as in {{name}} or {{*name}}"
    )]
    MisplacedBrace {
        /// The offending segment.
        segment: String,
    },
    /// A parameter name is empty or has characters outside `[A-Za-z0-9_]`.
    #[error("parameter name {name:?} must be one or more of [A-Za-z0-9_]")]
    BadParamName {
        /// The offending name.
        name: String,
    },
    /// A `{*name}` catch-all is followed by more segments.
    #[error("catch-all {{*{name}}} must be the last segment")]
    CatchAllNotLast {
        /// The catch-all's name.
        name: String,
    },
    /// Two parameters have the same name.
    #[error("parameter name {name:?} is used twice")]
    DuplicateParam {
        /// The repeated name.
        name: String,
    },
    /// A character that a canonical request path can never contain (see
    /// `crate::proxy::canonical::check_path`): a control byte, space, non-ASCII, `\`, `;`,
    /// `#` or `?`. A pattern containing one could never match, so it is refused.
    #[error("pattern contains {ch:?}, which a canonical path never contains")]
    ForbiddenChar {
        /// The offending character.
        ch: char,
    },
    /// A `%` that does not start a `%XX` escape a canonical path may hold: malformed, or the
    /// encoding of `/`, `\`, `.`, `%`, a control byte or a byte >= 0x80. Such a pattern could
    /// never match.
    #[error(
        "pattern has a '%' that is not an escape a canonical path may hold \
         (%XX, and not the encoding of '/', '\\', '.', '%', a control byte or non-ASCII)"
    )]
    ForbiddenEscape,
}

/// One segment of a compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Matches exactly these bytes.
    Literal(Box<str>),
    /// `{name}`: exactly one non-empty segment.
    Param(Box<str>),
    /// `{*name}`: one or more remaining segments.
    CatchAll(Box<str>),
}

/// A compiled path pattern: `/`-separated segments; literal (byte-exact, case-sensitive, no
/// decoding), `{name}` (exactly one non-empty segment), `{*name}` (only last: one or more segments).
///
/// ```
/// use credbroker::policy::Pattern;
///
/// let p = Pattern::parse("/repos/acme/{repo}/issues").unwrap();
/// assert!(p.matches("/repos/acme/widget/issues"));
/// assert!(!p.matches("/repos/ACME/widget/issues")); // literals are byte-exact
/// assert!(!p.matches("/repos/acme//issues"));       // `{repo}` needs a non-empty segment
/// assert!(Pattern::parse("/repos/{*rest}/x").is_err()); // a catch-all only comes last
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    source: Box<str>,
    segments: Vec<Segment>,
}

impl Pattern {
    /// Parses and validates a pattern; see [`PatternError`] for what is refused.
    pub fn parse(source: &str) -> Result<Pattern, PatternError> {
        if let Some(ch) = source.chars().find(|&c| is_forbidden_char(c)) {
            return Err(PatternError::ForbiddenChar { ch });
        }
        let rest = source
            .strip_prefix('/')
            .ok_or(PatternError::MissingLeadingSlash)?;
        let mut segments = Vec::new();
        // The pattern "/" is the root: zero segments.
        if !rest.is_empty() {
            for raw in rest.split('/') {
                segments.push(parse_segment(raw)?);
            }
        }
        check_catch_all_last(&segments)?;
        check_unique_names(&segments)?;
        // A literal may hold an escape (`my%20repo`), matched as written, byte for byte; only
        // the escapes the canonical check lets through can ever match.
        if source.contains('%') && crate::proxy::canonical::check_path(source).is_err() {
            return Err(PatternError::ForbiddenEscape);
        }
        Ok(Pattern {
            source: source.into(),
            segments,
        })
    }

    /// The pattern as written in the config.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The compiled segments (empty for the root pattern `/`).
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// True when the last segment is a `{*name}` catch-all (`check` warns about these).
    pub fn has_catch_all(&self) -> bool {
        matches!(self.segments.last(), Some(Segment::CatchAll(_)))
    }

    /// Straightforward segment-by-segment match (reference implementation for tests/proptests).
    ///
    /// The path is matched as given, without any decoding or normalisation. Parameters never
    /// bind an empty, `.` or `..` segment, so the matcher is safe even on a path that skipped
    /// the canonical check.
    pub fn matches(&self, path: &str) -> bool {
        let Some(mut segs) = path_segments(path) else {
            return false;
        };
        for (i, pat) in self.segments.iter().enumerate() {
            match pat {
                Segment::Literal(lit) => {
                    if segs.next() != Some(&**lit) {
                        return false;
                    }
                }
                Segment::Param(_) => {
                    if !segs.next().is_some_and(is_bindable) {
                        return false;
                    }
                }
                Segment::CatchAll(_) => {
                    // Parsing guarantees the catch-all is last.
                    debug_assert_eq!(i + 1, self.segments.len());
                    let mut count = 0usize;
                    for seg in segs.by_ref() {
                        if !is_bindable(seg) {
                            return false;
                        }
                        count += 1;
                    }
                    return count > 0;
                }
            }
        }
        segs.next().is_none()
    }
}

/// Splits a path into its segments: `/` has none, `/a/b` has `a`, `b`, `/a/` has `a`, ``.
/// `None` when the path does not start with `/`.
fn path_segments(path: &str) -> Option<impl Iterator<Item = &str>> {
    let rest = path.strip_prefix('/')?;
    // An empty `rest` is the root path and yields nothing; `skip` keeps one iterator type.
    let skip = usize::from(rest.is_empty());
    Some(rest.split('/').skip(skip))
}

/// A segment a `{name}` or `{*name}` may bind: non-empty and not a dot segment.
pub(crate) fn is_bindable(seg: &str) -> bool {
    !seg.is_empty() && seg != "." && seg != ".."
}

/// Characters `check_path` refuses anywhere in a path, plus `?` which ends a path. (`%` is
/// checked with the escape that follows it.)
fn is_forbidden_char(c: char) -> bool {
    !c.is_ascii() || c.is_ascii_control() || matches!(c, ' ' | '\\' | ';' | '#' | '?')
}

fn parse_segment(raw: &str) -> Result<Segment, PatternError> {
    if raw.is_empty() {
        return Err(PatternError::EmptySegment);
    }
    if raw == "." || raw == ".." {
        return Err(PatternError::DotSegment);
    }
    let misplaced = || PatternError::MisplacedBrace {
        segment: raw.to_owned(),
    };
    let Some(inner) = raw.strip_prefix('{') else {
        return match raw.contains(['{', '}']) {
            true => Err(misplaced()),
            false => Ok(Segment::Literal(raw.into())),
        };
    };
    let inner = inner.strip_suffix('}').ok_or_else(misplaced)?;
    if inner.contains(['{', '}']) {
        return Err(misplaced());
    }
    let (catch_all, name) = match inner.strip_prefix('*') {
        Some(name) => (true, name),
        None => (false, inner),
    };
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(PatternError::BadParamName {
            name: name.to_owned(),
        });
    }
    Ok(match catch_all {
        true => Segment::CatchAll(name.into()),
        false => Segment::Param(name.into()),
    })
}

fn check_catch_all_last(segments: &[Segment]) -> Result<(), PatternError> {
    let Some((_, init)) = segments.split_last() else {
        return Ok(());
    };
    match init.iter().find_map(|s| match s {
        Segment::CatchAll(name) => Some(name),
        _ => None,
    }) {
        Some(name) => Err(PatternError::CatchAllNotLast {
            name: name.to_string(),
        }),
        None => Ok(()),
    }
}

fn check_unique_names(segments: &[Segment]) -> Result<(), PatternError> {
    let names = segments.iter().filter_map(|s| match s {
        Segment::Param(n) | Segment::CatchAll(n) => Some(&**n),
        Segment::Literal(_) => None,
    });
    let mut seen: Vec<&str> = Vec::new();
    for name in names {
        if seen.contains(&name) {
            return Err(PatternError::DuplicateParam {
                name: name.to_owned(),
            });
        }
        seen.push(name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).unwrap()
    }

    #[test]
    fn parses_segments() {
        let pat = p("/repos/{owner}/x/{*rest}");
        assert_eq!(pat.as_str(), "/repos/{owner}/x/{*rest}");
        assert_eq!(
            pat.segments(),
            &[
                Segment::Literal("repos".into()),
                Segment::Param("owner".into()),
                Segment::Literal("x".into()),
                Segment::CatchAll("rest".into()),
            ]
        );
        assert!(pat.has_catch_all());
        assert!(!p("/a/{b}").has_catch_all());
        assert!(p("/").segments().is_empty());
    }

    #[test]
    fn parse_errors() {
        use PatternError::*;
        let cases: &[(&str, PatternError)] = &[
            ("", MissingLeadingSlash),
            ("repos", MissingLeadingSlash),
            ("//", EmptySegment),
            ("/a//b", EmptySegment),
            ("/a/", EmptySegment),
            ("/a/.", DotSegment),
            ("/../a", DotSegment),
            (
                "/a{b}",
                MisplacedBrace {
                    segment: "a{b}".into(),
                },
            ),
            (
                "/{b}a",
                MisplacedBrace {
                    segment: "{b}a".into(),
                },
            ),
            (
                "/{b",
                MisplacedBrace {
                    segment: "{b".into(),
                },
            ),
            (
                "/b}",
                MisplacedBrace {
                    segment: "b}".into(),
                },
            ),
            (
                "/{{b}}",
                MisplacedBrace {
                    segment: "{{b}}".into(),
                },
            ),
            ("/{}", BadParamName { name: "".into() }),
            ("/{*}", BadParamName { name: "".into() }),
            ("/{a-b}", BadParamName { name: "a-b".into() }),
            ("/{**a}", BadParamName { name: "*a".into() }),
            ("/{*a}/b", CatchAllNotLast { name: "a".into() }),
            ("/{a}/{a}", DuplicateParam { name: "a".into() }),
            ("/{a}/{*a}", DuplicateParam { name: "a".into() }),
            ("/a\\b", ForbiddenChar { ch: '\\' }),
            ("/a;b", ForbiddenChar { ch: ';' }),
            ("/a%2fb", ForbiddenEscape),
            ("/a%2Eb", ForbiddenEscape),
            ("/a%25", ForbiddenEscape),
            ("/a%c3%a9", ForbiddenEscape),
            ("/a%0a", ForbiddenEscape),
            ("/a%2", ForbiddenEscape),
            ("/a%zz/{b}", ForbiddenEscape),
            ("/caf\u{e9}", ForbiddenChar { ch: '\u{e9}' }),
            ("/a\tb", ForbiddenChar { ch: '\t' }),
            ("/a b", ForbiddenChar { ch: ' ' }),
            ("/a#b", ForbiddenChar { ch: '#' }),
            ("/a?b=1", ForbiddenChar { ch: '?' }),
        ];
        for (src, want) in cases {
            assert_eq!(Pattern::parse(src).as_ref(), Err(want), "pattern {src:?}");
        }
    }

    #[test]
    fn a_literal_escape_matches_as_written_and_nothing_else() {
        let pat = p("/repos/my%20repo/{n}");
        assert!(pat.matches("/repos/my%20repo/1"));
        for other in [
            "/repos/my repo/1",
            "/repos/my%2520repo/1",
            "/repos/my+repo/1",
        ] {
            assert!(!pat.matches(other), "{other}");
        }
        // Byte for byte, no decoding: the other hex case is another path.
        assert!(!p("/a%7e").matches("/a%7E"));
    }

    #[test]
    fn literal_is_byte_exact() {
        let pat = p("/repos/acme/widget");
        assert!(pat.matches("/repos/acme/widget"));
        for path in [
            "/Repos/acme/widget",
            "/repos/ACME/widget",
            "/repos/acme/widge%74",
            "/repos/acme/widget/",
            "/repos/acme//widget",
            "/repos/acme/./widget",
            "/repos/acme",
            "/repos/acme/widget/x",
            "repos/acme/widget",
            "",
        ] {
            assert!(!pat.matches(path), "{path:?} must not match");
        }
    }

    #[test]
    fn param_needs_one_non_empty_segment() {
        let pat = p("/repos/{repo}/issues");
        assert!(pat.matches("/repos/w/issues"));
        assert!(pat.matches("/repos/w%20x/issues"));
        for path in [
            "/repos//issues",
            "/repos/issues",
            "/repos/a/b/issues",
            "/repos/./issues",
            "/repos/../issues",
        ] {
            assert!(!pat.matches(path), "{path:?} must not match");
        }
        assert!(!p("/{a}").matches("/"));
    }

    #[test]
    fn catch_all_needs_at_least_one_segment() {
        let pat = p("/files/{*rest}");
        assert!(pat.matches("/files/a"));
        assert!(pat.matches("/files/a/b/c"));
        for path in [
            "/files",
            "/files/",
            "/files/a/",
            "/files/a//b",
            "/files/a/../b",
        ] {
            assert!(!pat.matches(path), "{path:?} must not match");
        }
    }

    #[test]
    fn root_pattern_matches_only_root() {
        let root = p("/");
        assert!(root.matches("/"));
        assert!(!root.matches(""));
        assert!(!root.matches("//"));
        assert!(!root.matches("/a"));
    }
}
