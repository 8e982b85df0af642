//! Repository names and references (tag or digest), per the OCI distribution spec's grammar.

use std::fmt;

use crate::Digest;

/// Longest repository name accepted (the spec's practical limit: host + name under 255).
const MAX_NAME_LEN: usize = 255;
/// Tags: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
const MAX_TAG_LEN: usize = 128;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("repository name is empty")]
    Empty,
    #[error("repository name is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    #[error(
        "repository name component {0:?} is invalid: components are lowercase [a-z0-9] separated by '.', '_', '__' or '-'"
    )]
    Component(String),
    #[error("tag {0:?} is invalid: tags match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}")]
    Tag(String),
    #[error("digest {value:?} is invalid: {source}")]
    Digest { value: String, source: crate::DigestError },
}

/// Checks a repository name: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    for component in name.split('/') {
        if !valid_component(component) {
            return Err(NameError::Component(component.chars().take(64).collect()));
        }
    }
    Ok(())
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-".
        let start = i;
        let sep = b[i];
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let run = &b[start..i];
        let ok = match sep {
            b'.' => run == b".",
            b'_' => run == b"_" || run == b"__",
            b'-' => run.iter().all(|&x| x == b'-'),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

/// Applies the registry's implicit namespace: Docker Hub puts single-segment names under `library/`.
pub fn normalize_name(name: &str, implicit_library: bool) -> String {
    if implicit_library && !name.contains('/') { format!("library/{name}") } else { name.to_owned() }
}

/// What a manifest request names: a tag (mutable) or a digest (immutable).
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl Reference {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.contains(':') {
            return s
                .parse::<Digest>()
                .map(Reference::Digest)
                .map_err(|source| NameError::Digest { value: s.chars().take(80).collect(), source });
        }
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= MAX_TAG_LEN
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b.iter().all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'));
        if ok { Ok(Reference::Tag(s.to_owned())) } else { Err(NameError::Tag(s.chars().take(80).collect())) }
    }

    /// The tag, or the digest's `sha256:...` text.
    pub fn as_str(&self) -> &str {
        match self {
            Reference::Tag(t) => t,
            Reference::Digest(d) => d.as_str(),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "library/alpine", "a.b_c__d--e/f-g", "org/sub/image", "0/9"] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "A", "a/", "/a", "a//b", "..", "a/../b", "a_._b", "a___b", "-a", "a-", "a%2fb", "a b"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert_eq!(validate_name(&"a".repeat(256)), Err(NameError::TooLong));
    }

    #[test]
    fn references() {
        assert_eq!(Reference::parse("v1.2-rc_3"), Ok(Reference::Tag("v1.2-rc_3".into())));
        assert!(Reference::parse(&"a".repeat(128)).is_ok());
        assert!(Reference::parse(&"a".repeat(129)).is_err());
        for bad in ["", ".hidden", "-x", "a/b", "..", "a b"] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
        assert!(matches!(Reference::parse("sha512:00"), Err(NameError::Digest { .. })));
    }

    #[test]
    fn docker_hub_library() {
        assert_eq!(normalize_name("alpine", true), "library/alpine");
        assert_eq!(normalize_name("bitnami/redis", true), "bitnami/redis");
        assert_eq!(normalize_name("alpine", false), "alpine");
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::Digest;

    proptest! {
        /// Whatever the input, parsing answers (no panic), and what it accepts is safe to use as a
        /// path component: no `..`, no `/` in references, no `%`, no NUL.
        #[test]
        fn names_and_references_never_panic(s in "\\PC{0,300}") {
            if validate_name(&s).is_ok() {
                prop_assert!(!s.split('/').any(|c| c.is_empty() || c == "." || c == ".."));
                prop_assert!(!s.contains(['%', '\0', '\\']) && s.len() <= 255);
            }
            if let Ok(r) = Reference::parse(&s) {
                let shown = r.to_string();
                prop_assert!(!shown.contains(['/', '%', '\0']) && !shown.starts_with('.'));
            }
            let _ = s.parse::<Digest>();
        }

        #[test]
        fn valid_names_are_accepted(parts in proptest::collection::vec("[a-z0-9]{1,8}([._-][a-z0-9]{1,8}){0,2}", 1..5)) {
            let name = parts.join("/");
            prop_assume!(name.len() <= 255);
            prop_assert_eq!(validate_name(&name), Ok(()));
        }

        #[test]
        fn digests_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let d = Digest::of(&bytes);
            prop_assert_eq!(d.to_string().parse::<Digest>(), Ok(d));
        }
    }
}
