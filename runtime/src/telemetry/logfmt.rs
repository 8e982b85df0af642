//! The text log line, written faster: byte for byte what tracing-subscriber's default text format
//! writes without colours (the tests below compare the two), through fast paths for what request
//! lines carry (plain strings, integers, booleans) and a timestamp whose date and time of day are
//! formatted once a second. With colours (a terminal), and for whatever is unusual (a string that
//! needs escapes, an error, `r#` names), each field goes through tracing-subscriber's own visitor.
//!
//! The line of a warm manifest hit cost 22.7k instructions through the default format, 10.7k here
//! (bench/hitcost.py).

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};
use tracing_subscriber::fmt::time::FormatTime;

/// The fields of a text line, as [`tracing_subscriber::fmt::format::DefaultFields`] writes them.
#[derive(Debug, Default, Clone, Copy)]
pub struct Fields;

impl<'a> MakeVisitor<Writer<'a>> for Fields {
    type Visitor = FieldsVisitor<'a>;

    fn make_visitor(&self, writer: Writer<'a>) -> Self::Visitor {
        FieldsVisitor { writer, is_empty: true, result: Ok(()) }
    }
}

pub struct FieldsVisitor<'a> {
    writer: Writer<'a>,
    is_empty: bool,
    result: fmt::Result,
}

impl FieldsVisitor<'_> {
    /// Whether this field is written here (`Some(name)`, after its separating space) or handed
    /// to tracing-subscriber's visitor (`None`: colours, `r#` names, the message). Fields of
    /// `log` records bridged to tracing (`log.target`, ...) are metadata, never written.
    fn fast(&mut self, field: &Field) -> Option<&'static str> {
        let name = field.name();
        if self.result.is_err() || self.writer.has_ansi_escapes() || name == "message" || name.starts_with("r#") {
            return None;
        }
        if self.is_empty {
            self.is_empty = false;
        } else if let Err(e) = self.writer.write_char(' ') {
            self.result = Err(e);
            return None;
        }
        Some(name)
    }

    fn skipped(field: &Field) -> bool {
        field.name().starts_with("log.")
    }

    /// tracing-subscriber's own visitor for one field, on the same line.
    fn fallback(&mut self, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if self.result.is_err() {
            return;
        }
        let mut v = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut v);
        self.result = v.finish();
        self.is_empty = false;
    }

    /// A number or a boolean: `name=value`, as tracing-subscriber writes them.
    fn plain(&mut self, field: &Field, value: impl fmt::Display, fallback: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if Self::skipped(field) {
            return;
        }
        match self.fast(field) {
            Some(name) => self.write(name, format_args!("{value}")),
            None => self.fallback(fallback),
        }
    }

    fn write(&mut self, name: &str, value: fmt::Arguments<'_>) {
        let w = &mut self.writer;
        self.result = w.write_str(name).and_then(|()| w.write_char('=')).and_then(|()| w.write_fmt(value));
    }
}

/// What `{:?}` of a `&str` writes between its quotes unchanged: printable ASCII but `"` and `\`.
fn needs_no_escape(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

impl Visit for FieldsVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if Self::skipped(field) {
            return;
        }
        if needs_no_escape(value)
            && let Some(name) = self.fast(field)
        {
            let w = &mut self.writer;
            self.result = w.write_str(name).and_then(|()| w.write_str("=\"")).and_then(|()| w.write_str(value));
            self.result = self.result.and_then(|()| w.write_char('"'));
            return;
        }
        self.fallback(|v| v.record_str(field, value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.plain(field, value, |v| v.record_u64(field, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.plain(field, value, |v| v.record_i64(field, value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.plain(field, value, |v| v.record_bool(field, value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if !Self::skipped(field) {
            self.fallback(|v| v.record_error(field, value));
        }
    }

    /// `%display` and `?debug` fields, floats: `name=` and the value's `Debug`, as
    /// tracing-subscriber writes them without colours.
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if Self::skipped(field) {
            return;
        }
        match self.fast(field) {
            Some(name) => self.write(name, format_args!("{value:?}")),
            None => self.fallback(|v| v.record_debug(field, value)),
        }
    }
}

impl VisitOutput<fmt::Result> for FieldsVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for FieldsVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

/// The UTC timestamp tracing-subscriber's default timer writes (`2026-12-04T01:30:00.123456Z`),
/// its date and time of day formatted once a second per thread.
#[derive(Debug, Default, Clone, Copy)]
pub struct Timestamp;

thread_local! {
    /// The second last formatted on this thread, and its `YYYY-MM-DDTHH:MM:SS`.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

impl FormatTime for Timestamp {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = now.as_secs();
        SECOND.with_borrow_mut(|(second, text)| {
            if *second != secs {
                *second = secs;
                text.clear();
                write_second(text, secs)?;
            }
            w.write_str(text)?;
            write!(w, ".{:06}Z", now.subsec_micros())
        })
    }
}

/// `YYYY-MM-DDTHH:MM:SS` of `secs` after the Unix epoch (UTC, proleptic Gregorian: the civil
/// date of a day count, after Howard Hinnant's `civil_from_days`).
fn write_second(out: &mut String, secs: u64) -> fmt::Result {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if year > 9999 {
        write!(out, "+{year}")?;
    } else {
        write!(out, "{year:04}")?;
    }
    write!(out, "-{month:02}-{day:02}T{:02}:{:02}:{:02}", rem / 3600, rem / 60 % 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::super::test_buf::SharedBuf;
    use super::*;

    #[derive(Debug)]
    struct Failure(Option<Box<Failure>>);

    impl fmt::Display for Failure {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(if self.0.is_some() { "outer \"failure\"" } else { "inner" })
        }
    }

    impl std::error::Error for Failure {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.0.as_deref().map(|e| e as _)
        }
    }

    /// The events the request log and the rest of the code emit, and what is unusual in them.
    fn events() {
        let path = String::from("/v2/lab/img/manifests/v1");
        let error = Failure(Some(Box::new(Failure(None))));
        tracing::info!(
            method = %"GET",
            path = %path,
            route = "key",
            kind = "manifest",
            cache = "",
            status = 200u16,
            bytes = 1234u64,
            duration_ms = 0.123,
            complete = true,
            error = "",
            trace_id = None::<String>,
            "request"
        );
        tracing::info!(quoted = "a \"b\" \\ c", newline = "x\ny", tab = "\t", esc = "\x1b[31m", uni = "é ✓", "m");
        tracing::warn!(dropped = 3usize, total = -4i64, big = u128::MAX, "log lines dropped: {}", "the writer");
        tracing::error!(error = &error as &(dyn std::error::Error + 'static), r#type = "raw", "with \x1b escape");
        tracing::info!(only = 1);
        tracing::info!("message only");
        tracing::info!(float = 1e-7, nan = f64::NAN, neg = -0.0, debug = ?vec!["a"], bytes = &b"\x00\xff"[..]);
    }

    fn render(ours: bool, ansi: bool) -> String {
        let buf = SharedBuf::default();
        let layer = tracing_subscriber::fmt::layer().with_writer(buf.clone()).with_ansi(ansi).without_time();
        let subscriber = tracing_subscriber::registry();
        match ours {
            true => tracing::subscriber::with_default(subscriber.with(layer.fmt_fields(Fields)), events),
            false => tracing::subscriber::with_default(subscriber.with(layer), events),
        }
        buf.text()
    }

    #[test]
    fn lines_are_byte_for_byte_tracing_subscribers_own() {
        for ansi in [false, true] {
            let (theirs, ours) = (render(false, ansi), render(true, ansi));
            assert_eq!(ours, theirs, "ansi {ansi}");
            assert_eq!(ours.lines().count(), 7);
        }
        let plain = render(true, false);
        assert_eq!(
            plain.lines().next().unwrap(),
            " INFO wharf_runtime::telemetry::logfmt::tests: request method=GET path=/v2/lab/img/manifests/v1 \
             route=\"key\" kind=\"manifest\" cache=\"\" status=200 bytes=1234 duration_ms=0.123 complete=true error=\"\""
        );
    }

    #[test]
    fn timestamps_match_the_default_timer() {
        let ours = |secs: u64| {
            let mut s = String::new();
            write_second(&mut s, secs).unwrap();
            s
        };
        assert_eq!(ours(0), "1970-01-01T00:00:00");
        assert_eq!(ours(951_868_799), "2000-02-29T23:59:59");
        assert_eq!(ours(1_796_342_400), "2026-12-04T00:00:00");
        assert_eq!(ours(4_107_542_399), "2100-02-28T23:59:59");
        assert_eq!(ours(4_107_542_400), "2100-03-01T00:00:00");
        assert_eq!(ours(253_402_300_799), "9999-12-31T23:59:59");
        assert_eq!(ours(253_402_300_800), "+10000-01-01T00:00:00");
        // Against tracing-subscriber's timer, on the same second (retried across a boundary).
        for _ in 0..3 {
            let (mut a, mut b) = (String::new(), String::new());
            tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut a)).unwrap();
            Timestamp.format_time(&mut Writer::new(&mut b)).unwrap();
            if a[..19] == b[..19] {
                assert_eq!(a.len(), b.len(), "{a} {b}");
                assert!(b.ends_with('Z') && b.as_bytes()[19] == b'.', "{b}");
                return;
            }
        }
        panic!("the two timers never agreed on the second");
    }
}
