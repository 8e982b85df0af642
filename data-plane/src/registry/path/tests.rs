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
    use proptest::prelude::*;

    use super::*;

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
