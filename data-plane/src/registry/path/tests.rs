use super::*;

fn p(s: &str) -> Result<RegistryPath, RegistryError> {
    parse_path(s)
}

#[test]
fn parses_paths() {
    let d = Digest::of(b"x");
    let r = p(&format!("hub/library/alpine/blobs/{d}")).unwrap();
    let (key, name) = r.keyed().unwrap();
    assert_eq!((key.as_str(), name, r.target.clone()), ("hub", "library/alpine", Target::Blob(d.clone())));
    let r = p("hub/alpine/manifests/3.20").unwrap();
    assert_eq!(r.target, Target::Manifest(Reference::Tag("3.20".into())));
    assert_eq!(p("lab/a/b/c/tags/list").unwrap().keyed().unwrap().1, "a/b/c");
    // Mirror paths: a single-segment name, or one whose first segment is no repoKey.
    let alpine = p("alpine/manifests/latest").unwrap();
    assert_eq!((alpine.name.as_str(), alpine.keyed()), ("alpine", None));
    assert_eq!(p("a__b/c/manifests/v1").unwrap().keyed(), None);
    assert_eq!(p(&format!("lab/x/referrers/{d}")).unwrap().target, Target::Referrers(d));
    // A repository may be named "manifests" or "blobs".
    assert_eq!(p("lab/blobs/manifests/v1").unwrap().keyed().unwrap().1, "blobs");
}

#[test]
fn rejects_bad_paths() {
    let cases = [
        ("lab/../etc/manifests/v1", "NAME_INVALID"),
        ("lab/a/../../manifests/v1", "NAME_INVALID"),
        ("lab/%2e%2e/manifests/v1", "NAME_INVALID"),
        ("lab/a%2fb/manifests/v1", "NAME_INVALID"),
        ("lab/Upper/manifests/v1", "NAME_INVALID"),
        ("lab/a//b/manifests/v1", "NAME_INVALID"),
        ("Lab/a/manifests/v1", "NAME_INVALID"),
        ("lab/a/manifests/..", "MANIFEST_UNKNOWN"),
        ("lab/a/blobs/sha512:abcd", "DIGEST_INVALID"),
        ("lab/a/blobs/sha256:abcd", "DIGEST_INVALID"),
        ("lab/a/blobs/notadigest", "DIGEST_INVALID"),
        ("lab/a/manifests/sha256:zz", "DIGEST_INVALID"),
        ("lab/a/other/x", "UNSUPPORTED"),
        ("manifests/v1", "UNSUPPORTED"),
    ];
    let sha512 = format!("sha512:{}", "ab".repeat(64));
    let unknown =
        [(format!("lab/a/blobs/{sha512}"), "BLOB_UNKNOWN"), (format!("lab/a/manifests/{sha512}"), "MANIFEST_UNKNOWN")];
    for (path, code) in unknown {
        let e = p(&path).map(|_| ()).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (404, code), "{path}");
    }
    for (path, code) in cases {
        assert_eq!(p(path).map(|_| ()).unwrap_err().code, code, "{path}");
    }
    let huge = format!("lab/a/manifests/{}", "t".repeat(300));
    assert_eq!(p(&huge).unwrap_err().code, "MANIFEST_UNKNOWN");
}

mod fuzz {
    use std::cell::Cell;

    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    use super::*;

    /// A name component, and whether the grammar takes it.
    fn component() -> impl Strategy<Value = (&'static str, bool)> {
        prop_oneof![
            6 => prop::sample::select(vec!["a", "library", "a.b", "a_b", "a__b", "a-b", "a--b", "x9", "manifests", "blobs"])
                .prop_map(|c| (c, true)),
            1 => prop::sample::select(vec!["..", ".", "", "A", "-a", "a-", "_a", "a..b", "a___b", "%2e"])
                .prop_map(|c| (c, false)),
        ]
    }

    /// The part after the name, and the target it means (`None`: refused).
    fn target() -> impl Strategy<Value = (String, Option<&'static str>)> {
        let hex = "[0-9a-f]{64}";
        prop_oneof![
            3 => prop::sample::select(vec!["v1", "latest", "1.0_rc-2", "V"]).prop_map(|t| (format!("manifests/{t}"), Some("manifest"))),
            1 => prop::sample::select(vec!["..", ".x", "-v", ""]).prop_map(|t| (format!("manifests/{t}"), None)),
            2 => hex.prop_map(|h| (format!("manifests/sha256:{h}"), Some("manifest"))),
            2 => hex.prop_map(|h| (format!("blobs/sha256:{h}"), Some("blob"))),
            1 => prop::sample::select(vec!["sha256:xyz", "sha256:", "md5:00", "notadigest"]).prop_map(|d| (format!("blobs/{d}"), None)),
            2 => Just(("tags/list".to_owned(), Some("tags"))),
            1 => hex.prop_map(|h| (format!("referrers/sha256:{h}"), Some("referrers"))),
            1 => prop::sample::select(vec!["tags/other", "uploads/x", "catalog/x"]).prop_map(|t| (t.to_owned(), None)),
        ]
    }

    /// Paths built from every kind of segment (valid and invalid name components, tags, digests,
    /// listings, unknown endpoints) are accepted exactly when each part is valid, with the right
    /// target; each target is reached in a good share of the cases (counted).
    #[test]
    fn built_paths_parse_as_their_parts_say() {
        let strategy = (prop::collection::vec(component(), 1..5), target());
        let reached: [Cell<u32>; 5] = Default::default();
        let cases = 2_000;
        let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
        runner
            .run(&strategy, |(components, (rest, kind))| {
                let name: Vec<&str> = components.iter().map(|(c, _)| *c).collect();
                let path = format!("{}/{rest}", name.join("/"));
                let valid = components.iter().all(|(_, ok)| *ok) && kind.is_some();
                let got = parse_path(&path);
                prop_assert_eq!(got.is_ok(), valid, "{} -> {:?}", path, got.as_ref().err().map(|e| e.code));
                let slot = match got.as_ref().map(|p| p.target.kind()) {
                    Ok(k) => {
                        prop_assert_eq!(Some(k), kind, "{}", path);
                        let joined = name.join("/");
                        prop_assert_eq!(got.as_ref().map(|p| p.name.as_str()).ok(), Some(joined.as_str()));
                        ["manifest", "blob", "tags", "referrers"].iter().position(|x| *x == k).unwrap_or(4)
                    }
                    Err(e) => {
                        prop_assert!(e.status.is_client_error(), "{}: {}", path, e.status);
                        4
                    }
                };
                reached[slot].set(reached[slot].get() + 1);
                Ok(())
            })
            .unwrap();
        for (what, n) in ["manifest", "blob", "tags", "referrers", "refused"].iter().zip(&reached) {
            assert!(f64::from(n.get()) / f64::from(cases) >= 0.04, "only {} of {cases} cases reached {what}", n.get());
        }
    }

    proptest! {
        /// The request-path parser answers every path (an OCI error or a parsed target); what it
        /// accepts names nothing outside the cache dir.
        #[test]
        fn paths_never_panic_and_stay_inside(path in "[a-zA-Z0-9._%:/-]{0,200}") {
            if let Ok(p) = parse_path(&path) {
                prop_assert!(!p.name.split('/').any(|c| c == ".." || c == "." || c.is_empty()));
                prop_assert!(!path.contains('%'));
                if let Target::Manifest(Reference::Tag(t)) = &p.target {
                    prop_assert!(!t.contains('/') && !t.starts_with('.'));
                }
            }
        }

        #[test]
        fn arbitrary_text_never_panics(path in "\\PC{0,300}") {
            let _ = parse_path(&path);
        }
    }
}
