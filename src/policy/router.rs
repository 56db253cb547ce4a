//! The per-connector operation router (DESIGN §3.1, §3.2): every operation's method and path
//! pattern compiled into one segment trie per method, so finding the operations that match a
//! call costs time in the path's depth, not in the number of operations.

use http::Method;

use super::pattern::{is_bindable, Pattern, Segment};

/// All operations of one connector compiled into a segment trie keyed by method. Matching cost
/// depends on the path's depth, not on the number of operations. A hand-written trie rather than
/// matchit because several patterns may match one path (a literal and a `{param}` at the same
/// level) and the broker must try each in turn — the first may be ungranted, a later one granted
/// — while matchit returns only its single best match.
#[derive(Debug, Clone, Default)]
pub struct OperationRouter {
    /// One trie per method; a connector uses a handful of methods, so a linear scan is cheapest.
    methods: Vec<(Method, Node)>,
}

/// A trie node: the state after matching some leading segments.
#[derive(Debug, Clone, Default)]
struct Node {
    /// Children for literal segments, looked up by the request segment's exact bytes.
    literals: crate::ConfigMap<Box<str>, Node>,
    /// The child for a `{name}` segment (names do not matter for matching).
    param: Option<Box<Node>>,
    /// Operations whose pattern ends here with a `{*name}` catch-all, in insertion order.
    catch_all: Vec<usize>,
    /// Operations whose pattern ends exactly here, in insertion order.
    ops: Vec<usize>,
}

impl OperationRouter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `operation` (an index the caller chooses, e.g. into the connector's operation list)
    /// under `method` and `pattern`. Equal patterns keep their insertion order.
    pub fn insert(&mut self, method: Method, pattern: &Pattern, operation: usize) {
        let mut node = self.trie_mut(method);
        for seg in pattern.segments() {
            match seg {
                Segment::Literal(lit) => node = node.literals.entry(lit.clone()).or_default(),
                Segment::Param(_) => node = node.param.get_or_insert_with(Box::default),
                Segment::CatchAll(_) => {
                    node.catch_all.push(operation);
                    return;
                }
            }
        }
        node.ops.push(operation);
    }

    /// Calls `accept(op)` for each operation whose method and pattern match `path`, most specific
    /// first (at each segment: literal child, then param, then catch-all), and returns the first op
    /// for which `accept` returns true. No allocation on the hot path.
    pub fn find(
        &self,
        method: &Method,
        path: &str,
        mut accept: impl FnMut(usize) -> bool,
    ) -> Option<usize> {
        let root = self.trie(method)?;
        let rest = root_rest(path)?;
        root.find(rest, &mut accept)
    }

    /// True when any operation (any method) matches the path — for error messages and `explain`.
    pub fn path_known(&self, path: &str) -> bool {
        let Some(rest) = root_rest(path) else {
            return false;
        };
        self.methods
            .iter()
            .any(|(_, root)| root.find(rest, &mut |_| true).is_some())
    }

    /// True when no operation has been inserted.
    pub fn is_empty(&self) -> bool {
        self.methods.is_empty()
    }

    fn trie(&self, method: &Method) -> Option<&Node> {
        self.methods
            .iter()
            .find(|(m, _)| m == method)
            .map(|(_, node)| node)
    }

    fn trie_mut(&mut self, method: Method) -> &mut Node {
        let index = match self.methods.iter().position(|(m, _)| *m == method) {
            Some(index) => index,
            None => {
                self.methods.push((method, Node::default()));
                self.methods.len() - 1
            }
        };
        &mut self.methods[index].1
    }
}

/// The path as the trie walks it: `None` when it does not start with `/`, `Some(None)` for the
/// root path `/` (no segments), otherwise `Some(Some(rest))` with the leading `/` removed.
fn root_rest(path: &str) -> Option<Option<&str>> {
    let rest = path.strip_prefix('/')?;
    Some((!rest.is_empty()).then_some(rest))
}

impl Node {
    /// Depth-first search. `rest` is the unmatched tail of the path without its leading `/`
    /// (`None` once every segment is consumed). Recursion depth is bounded by the trie's depth,
    /// i.e. by the longest configured pattern, not by the request.
    fn find(&self, rest: Option<&str>, accept: &mut impl FnMut(usize) -> bool) -> Option<usize> {
        let Some(rest) = rest else {
            return self.ops.iter().copied().find(|&op| accept(op));
        };
        // A byte search: segments are short, and `str`'s searcher costs more to set up than
        // they cost to scan (`/` is ASCII, so `i` is a char boundary).
        let (seg, tail) = match rest.bytes().position(|b| b == b'/') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        if let Some(child) = self.literals.get(seg) {
            if let Some(op) = child.find(tail, accept) {
                return Some(op);
            }
        }
        if let Some(child) = &self.param {
            if is_bindable(seg) {
                if let Some(op) = child.find(tail, accept) {
                    return Some(op);
                }
            }
        }
        if !self.catch_all.is_empty() && rest.split('/').all(is_bindable) {
            return self.catch_all.iter().copied().find(|&op| accept(op));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(ops: &[(Method, &str)]) -> OperationRouter {
        let mut r = OperationRouter::new();
        for (i, (m, p)) in ops.iter().enumerate() {
            r.insert(m.clone(), &Pattern::parse(p).unwrap(), i);
        }
        r
    }

    fn all_matches(r: &OperationRouter, method: &Method, path: &str) -> Vec<usize> {
        let mut seen = Vec::new();
        let found = r.find(method, path, |op| {
            seen.push(op);
            false
        });
        assert_eq!(found, None);
        seen
    }

    #[test]
    fn priority_literal_then_param_then_catch_all() {
        let r = router(&[
            (Method::GET, "/repos/{*rest}"),
            (Method::GET, "/repos/{repo}/issues"),
            (Method::GET, "/repos/widget/issues"),
            (Method::GET, "/repos/{repo}/{what}"),
        ]);
        assert_eq!(
            all_matches(&r, &Method::GET, "/repos/widget/issues"),
            vec![2, 1, 3, 0]
        );
        assert_eq!(
            r.find(&Method::GET, "/repos/widget/issues", |_| true),
            Some(2)
        );
        assert_eq!(
            all_matches(&r, &Method::GET, "/repos/gadget/issues"),
            vec![1, 3, 0]
        );
        assert_eq!(all_matches(&r, &Method::GET, "/repos/a/b/c"), vec![0]);
        assert!(all_matches(&r, &Method::GET, "/repos").is_empty());
    }

    #[test]
    fn falls_through_when_first_match_is_not_accepted() {
        let r = router(&[
            (Method::GET, "/repos/acme/widget"),
            (Method::GET, "/repos/acme/{repo}"),
        ]);
        // The literal operation is not granted: the param operation must still be found.
        assert_eq!(
            r.find(&Method::GET, "/repos/acme/widget", |op| op != 0),
            Some(1)
        );
        assert_eq!(r.find(&Method::GET, "/repos/acme/widget", |_| false), None);
    }

    #[test]
    fn duplicate_patterns_keep_insertion_order() {
        let r = router(&[(Method::GET, "/a/{x}"), (Method::GET, "/a/{y}")]);
        assert_eq!(all_matches(&r, &Method::GET, "/a/b"), vec![0, 1]);
    }

    #[test]
    fn methods_are_separate() {
        let r = router(&[(Method::GET, "/issues"), (Method::POST, "/issues/{n}")]);
        assert_eq!(r.find(&Method::GET, "/issues", |_| true), Some(0));
        assert_eq!(r.find(&Method::POST, "/issues", |_| true), None);
        assert_eq!(r.find(&Method::POST, "/issues/1", |_| true), Some(1));
        assert_eq!(r.find(&Method::GET, "/issues/1", |_| true), None);
        assert_eq!(r.find(&Method::DELETE, "/issues", |_| true), None);
        let get_lower = Method::from_bytes(b"get").unwrap();
        assert_eq!(r.find(&get_lower, "/issues", |_| true), None);
        assert!(r.path_known("/issues"));
        assert!(r.path_known("/issues/1"));
        assert!(!r.path_known("/issues/1/x"));
        assert!(!r.path_known("/Issues"));
    }

    #[test]
    fn a_literal_escape_is_matched_byte_for_byte() {
        let r = router(&[(Method::GET, "/repos/my%20repo/{n}")]);
        assert_eq!(
            r.find(&Method::GET, "/repos/my%20repo/1", |_| true),
            Some(0)
        );
        for path in [
            "/repos/my repo/1",
            "/repos/my%2520repo/1",
            "/repos/my%20Repo/1",
        ] {
            assert_eq!(r.find(&Method::GET, path, |_| true), None, "{path:?}");
        }
    }

    #[test]
    fn refuses_non_canonical_shapes() {
        let r = router(&[
            (Method::GET, "/"),
            (Method::GET, "/a/{x}"),
            (Method::GET, "/b/{*rest}"),
        ]);
        assert_eq!(r.find(&Method::GET, "/", |_| true), Some(0));
        for path in [
            "", "a", "//", "/a/", "/a//", "/a/..", "/a/.", "/b/", "/b/x/", "/b/x//y",
        ] {
            assert_eq!(r.find(&Method::GET, path, |_| true), None, "{path:?}");
        }
        assert!(!r.is_empty());
        assert!(OperationRouter::new().is_empty());
    }

    #[test]
    fn ten_thousand_operations() {
        let mut r = OperationRouter::new();
        let mut patterns = Vec::new();
        for i in 0..10_000 {
            let src = match i % 3 {
                0 => format!("/orgs/o{i}/repos"),
                1 => format!("/repos/o{i}/{{repo}}/issues"),
                _ => format!("/repos/o{i}/{{repo}}/issues/{{number}}/comments"),
            };
            let pat = Pattern::parse(&src).unwrap();
            let method = if i % 2 == 0 {
                Method::GET
            } else {
                Method::POST
            };
            r.insert(method.clone(), &pat, i);
            patterns.push((method, pat));
        }
        assert_eq!(r.find(&Method::GET, "/orgs/o0/repos", |_| true), Some(0));
        assert_eq!(
            r.find(&Method::POST, "/repos/o1/w/issues", |_| true),
            Some(1)
        );
        assert_eq!(
            r.find(&Method::GET, "/repos/o9998/w/issues/7/comments", |_| true),
            Some(9998)
        );
        assert_eq!(
            r.find(&Method::GET, "/repos/o9997/w/issues", |_| true),
            None
        );
        assert_eq!(
            r.find(&Method::POST, "/repos/o9997/w/issues", |_| true),
            Some(9997)
        );
        assert!(!r.path_known("/orgs/o10000/repos"));
        // Every operation is found by its own example path and only by it.
        for (i, (method, pat)) in patterns.iter().enumerate() {
            let path = pat.as_str().replace("{repo}", "w").replace("{number}", "3");
            assert_eq!(all_matches(&r, method, &path), vec![i]);
        }
    }

    mod proptests {
        use proptest::prelude::*;

        use super::*;

        /// A pattern segment: a literal from a small alphabet (so paths often hit it), a param,
        /// or (when last) a catch-all.
        fn pattern_source() -> impl Strategy<Value = String> {
            // `select`, not string literals: those would be regex strategies.
            let seg = prop::sample::select(vec!["a", "A", "b", "x.y", "-", "{}"]);
            (prop::collection::vec(seg, 0..4), any::<bool>()).prop_map(|(segs, catch_all)| {
                let mut out = String::new();
                for (i, s) in segs.iter().enumerate() {
                    match *s {
                        "{}" => out.push_str(&format!("/{{p{i}}}")),
                        lit => out.push_str(&format!("/{lit}")),
                    }
                }
                if catch_all {
                    out.push_str("/{*rest}");
                }
                if out.is_empty() {
                    out.push('/');
                }
                out
            })
        }

        /// Request paths mixing the literals above with dots, empty segments, case and
        /// percent-encoded variants.
        fn request_path() -> impl Strategy<Value = String> {
            let seg = prop::sample::select(vec![
                "a", "A", "b", "B", "x.y", "-", ".", "..", "", "%61", "%2e", "%2F", "c",
            ]);
            (prop::collection::vec(seg, 0..6), any::<bool>(), 0u8..10).prop_map(
                |(segs, trailing, lead)| {
                    let mut out = if lead == 0 {
                        String::new()
                    } else {
                        "/".to_owned()
                    };
                    out.push_str(&segs.join("/"));
                    if trailing {
                        out.push('/');
                    }
                    out
                },
            )
        }

        proptest! {
            #[test]
            fn trie_agrees_with_linear_scan(
                ops in prop::collection::vec((any::<bool>(), pattern_source()), 1..10),
                paths in prop::collection::vec(request_path(), 1..20),
            ) {
                let mut r = OperationRouter::new();
                let mut compiled = Vec::new();
                for (i, (post, src)) in ops.iter().enumerate() {
                    let method = if *post { Method::POST } else { Method::GET };
                    let pat = Pattern::parse(src).unwrap();
                    r.insert(method.clone(), &pat, i);
                    compiled.push((method, pat));
                }
                for path in &paths {
                    for method in [Method::GET, Method::POST] {
                        let mut trie = all_matches(&r, &method, path);
                        trie.sort_unstable();
                        let linear: Vec<usize> = compiled
                            .iter()
                            .enumerate()
                            .filter(|(_, (m, p))| *m == method && p.matches(path))
                            .map(|(i, _)| i)
                            .collect();
                        prop_assert_eq!(&trie, &linear, "path {:?} method {}", path, method);
                    }
                    let known = compiled.iter().any(|(_, p)| p.matches(path));
                    prop_assert_eq!(r.path_known(path), known);
                }
            }
        }
    }
}
