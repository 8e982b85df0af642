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
    // The unit is case-insensitive (RFC 9110, 14.1).
    let value = value.trim();
    let spec = value.get(..6).filter(|u| u.eq_ignore_ascii_case("bytes=")).map(|_| value[6..].trim())?;
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
            // No byte to give: a suffix of nothing, or any suffix of an empty body (RFC 9110, 14.1.2).
            RangeSpec::Suffix(0) => Resolved::Unsatisfiable,
            RangeSpec::Suffix(_) if size == 0 => Resolved::Unsatisfiable,
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
        assert_eq!(parse("BYTES=0-9"), Some(RangeSpec::From { start: 0, end: Some(9) }));
        for ignored in [
            "",
            "bytes=",
            "bytes=a-b",
            "items=0-1",
            "bytes =0-1",
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
        // An empty body has no byte to give, whatever the suffix.
        assert_eq!(parse("bytes=-1").map(|x| x.resolve(0)), Some(Resolved::Unsatisfiable));
    }
}

#[cfg(test)]
mod fuzz {
    use std::cell::Cell;

    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    use super::*;

    /// A number as a client may write it: small, with leading zeros, at and past u64's end.
    fn number() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => (0u64..5_000).prop_map(|n| n.to_string()),
            1 => (0u64..100).prop_map(|n| format!("000{n}")),
            1 => Just(u64::MAX.to_string()),
            1 => Just("18446744073709551616".to_owned()),
            1 => Just("x1".to_owned()),
        ]
    }

    /// What the parser must make of a near-valid header, written down separately: the unit
    /// `bytes` in any case, no space before `=`; one range only; numbers of at most 19 digits that
    /// fit u64; `a-b` with b >= a, `a-`, `-n`; spaces around the numbers are tolerated.
    fn model(unit: &str, first: &str, last: &str, extra: usize) -> Option<RangeSpec> {
        if !unit.eq_ignore_ascii_case("bytes") || extra > 0 {
            return None;
        }
        let num = |s: &str| {
            (s.len() <= 19 && !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse::<u64>().ok())
                .flatten()
        };
        match (first.is_empty(), last.is_empty()) {
            (true, true) => None,
            (true, false) => num(last).map(RangeSpec::Suffix),
            (false, true) => num(first).map(|start| RangeSpec::From { start, end: None }),
            (false, false) => {
                let (a, b) = (num(first)?, num(last)?);
                (b >= a).then_some(RangeSpec::From { start: a, end: Some(b) })
            }
        }
    }

    /// Near-valid headers (odd spacing, several ranges, overflowing numbers, other units) parse as
    /// the model says, and every branch is reached in a good share of the cases (counted).
    #[test]
    fn near_valid_ranges_parse_as_the_model_says() {
        let header = (
            prop_oneof![4 => Just("bytes"), 1 => Just("BYTES"), 1 => Just("Bytes"), 1 => Just("items")],
            prop_oneof![2 => Just(String::new()), 4 => number()],
            prop_oneof![1 => Just(String::new()), 3 => number()],
            prop_oneof![5 => Just(0usize), 1 => 1usize..3],
            "[ ]{0,2}",
            0u64..10_000,
        );
        let (from, suffix, none, partial) = (Cell::new(0), Cell::new(0), Cell::new(0), Cell::new(0));
        let cases = 2_000;
        let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
        runner
            .run(&header, |(unit, first, last, extra, sp, size)| {
                let mut h = format!("{unit}={sp}{first}{sp}-{sp}{last}");
                for i in 0..extra {
                    h.push_str(&format!(",{sp}{i}-{}", i + 1));
                }
                let got = parse(&h);
                prop_assert_eq!(got, model(unit, &first, &last, extra), "{:?}", h);
                match got {
                    Some(RangeSpec::From { .. }) => from.set(from.get() + 1),
                    Some(RangeSpec::Suffix(_)) => suffix.set(suffix.get() + 1),
                    None => none.set(none.get() + 1),
                }
                if let Some(Resolved::Partial { start, end }) = got.map(|g| g.resolve(size)) {
                    prop_assert!(start < end && end <= size);
                    partial.set(partial.get() + 1);
                }
                Ok(())
            })
            .unwrap();
        let share = |n: u32| f64::from(n) / f64::from(cases);
        for (what, n) in
            [("a-b / a-", from.get()), ("-n", suffix.get()), ("ignored", none.get()), ("partial", partial.get())]
        {
            assert!(share(n) >= 0.08, "only {n} of {cases} cases reached {what}");
        }
    }

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
