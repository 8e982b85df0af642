//! `Range: bytes=...` for blobs (RFC 9110 §14). One range is served; anything malformed, and
//! multi-range requests, are ignored (a full 200), as RFC 9110 allows.

/// A byte range spec as the client wrote it, before the size is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSpec {
    /// `a-b` or `a-` (end `None`).
    From { start: u64, end: Option<u64> },
    /// `-n`: the last n bytes.
    Suffix(u64),
}

/// What a range spec means for a body of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// Bytes `start..end` (end exclusive).
    Partial {
        start: u64,
        end: u64,
    },
    Unsatisfiable,
}

/// Parses a `Range` header value; `None` means: ignore it and send the whole body.
pub fn parse(value: &str) -> Option<RangeSpec> {
    let spec = value.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let num = |s: &str| -> Option<u64> {
        let s = s.trim();
        if s.is_empty() || s.len() > 19 || !s.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    if a.trim().is_empty() {
        return Some(RangeSpec::Suffix(num(b)?));
    }
    let start = num(a)?;
    let end = if b.trim().is_empty() { None } else { Some(num(b)?) };
    if matches!(end, Some(e) if e < start) {
        return None;
    }
    Some(RangeSpec::From { start, end })
}

impl RangeSpec {
    pub fn resolve(self, size: u64) -> Resolved {
        match self {
            RangeSpec::From { start, end } => {
                if start >= size {
                    return Resolved::Unsatisfiable;
                }
                let end = end.map_or(size, |e| e.saturating_add(1).min(size));
                Resolved::Partial { start, end }
            }
            RangeSpec::Suffix(0) => Resolved::Unsatisfiable,
            RangeSpec::Suffix(n) => Resolved::Partial { start: size.saturating_sub(n), end: size },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(parse("bytes=0-9"), Some(RangeSpec::From { start: 0, end: Some(9) }));
        assert_eq!(parse("bytes=10-"), Some(RangeSpec::From { start: 10, end: None }));
        assert_eq!(parse("bytes=-5"), Some(RangeSpec::Suffix(5)));
        for ignored in [
            "",
            "bytes=",
            "bytes=a-b",
            "items=0-1",
            "bytes=5-1",
            "bytes=0-1,3-4",
            "bytes=-",
            "bytes=99999999999999999999-",
        ] {
            assert_eq!(parse(ignored), None, "{ignored}");
        }
    }

    #[test]
    fn resolves() {
        let r = |s: &str| parse(s).map(|x| x.resolve(100));
        assert_eq!(r("bytes=0-9"), Some(Resolved::Partial { start: 0, end: 10 }));
        assert_eq!(r("bytes=90-200"), Some(Resolved::Partial { start: 90, end: 100 }));
        assert_eq!(r("bytes=-5"), Some(Resolved::Partial { start: 95, end: 100 }));
        assert_eq!(r("bytes=-500"), Some(Resolved::Partial { start: 0, end: 100 }));
        assert_eq!(r("bytes=100-"), Some(Resolved::Unsatisfiable));
        assert_eq!(r("bytes=-0"), Some(Resolved::Unsatisfiable));
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Any header parses without panicking; a resolved range always lies inside the body.
        #[test]
        fn ranges_stay_inside_the_body(h in "\\PC{0,40}", size in 0u64..10_000) {
            if let Some(Resolved::Partial { start, end }) = parse(&h).map(|spec| spec.resolve(size)) {
                prop_assert!(start < end && end <= size);
            }
        }

        #[test]
        fn well_formed_ranges_parse(a in 0u64..u64::MAX / 2, len in 0u64..1_000_000) {
            prop_assert_eq!(parse(&format!("bytes={a}-{}", a + len)), Some(RangeSpec::From { start: a, end: Some(a + len) }));
            prop_assert_eq!(parse(&format!("bytes=-{len}")), Some(RangeSpec::Suffix(len)));
        }
    }
}
