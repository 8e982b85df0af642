//! Logs and traces for both binaries: a `tracing-subscriber` registry with a JSON or text log layer
//! and, when an OTLP endpoint is configured, an OpenTelemetry layer exporting spans over gRPC.
//!
//! Export is off unless `--otlp-endpoint` (or `OTEL_EXPORTER_OTLP_ENDPOINT` /
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; then spans go through the SDK's batch processor, whose
//! queue is bounded (`OTEL_BSP_MAX_QUEUE_SIZE`, default 2048) and filled without blocking: a slow or
//! dead collector never slows a request. Spans that cannot be queued, or whose export failed, are
//! dropped and counted in `wharf_spans_dropped_total{reason}` (`queue_full`, `export_failed`).
//! The standard `OTEL_*` variables are honoured: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_BSP_*`, `OTEL_TRACES_SAMPLER(_ARG)`, `OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT/HEADERS`,
//! `OTEL_SDK_DISABLED`.
//!
//! Incoming and outgoing context is W3C Trace Context (`traceparent`), see [`extract`] and [`inject`].
//!
//! Head sampling: with `OTEL_TRACES_SAMPLER=traceidratio|parentbased_traceidratio` (or
//! `always_off`, `parentbased_always_off`: a ratio of 0, the first ignoring the `traceparent`), each
//! request is decided when it arrives ([`head_sampled`]: the incoming `traceparent`'s flag, else the
//! ratio), and a request that is not sampled runs in [`unsampled`]: none of its spans is even built
//! (the OpenTelemetry layer would otherwise build every span and drop it at the end), see
//! [`SkipUnsampled`]. The SDK then samples what reaches it (parent-based, always on), so the ratio
//! applies once.

mod logfmt;
#[cfg(test)]
mod test_buf;
mod writer;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::FilterExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

/// The logging and tracing flags of both binaries (`#[command(flatten)]`).
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryArgs {
    #[arg(long, value_enum, default_value = "text", env = "WHARF_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter: a level (info, debug) or tracing directives (wharf_proxy=debug,info).
    #[arg(long, default_value = "info", env = "WHARF_LOG_LEVEL")]
    pub log_level: String,
    /// OTLP gRPC collector for spans (http://collector:4317). Without it (and without
    /// OTEL_EXPORTER_OTLP_ENDPOINT), no spans are exported. Other OTEL_* variables are honoured.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// Log lines queued for the writer thread at most; when it falls behind (a slow disk, a pipe
    /// nobody reads), further lines are dropped and counted (wharf_log_lines_dropped_total), never
    /// waited for.
    #[arg(long, default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(1..), env = "WHARF_LOG_QUEUE_LINES")]
    pub log_queue_lines: u32,
}

impl TelemetryArgs {
    pub fn options(&self, service_name: &'static str) -> TelemetryOptions {
        TelemetryOptions {
            log_format: self.log_format,
            log_level: self.log_level.clone(),
            otlp_endpoint: self.otlp_endpoint.clone(),
            service_name,
            log_queue_lines: self.log_queue_lines as usize,
        }
    }
}

/// What [`init`] sets up.
#[derive(Debug, Clone)]
pub struct TelemetryOptions {
    pub log_format: LogFormat,
    /// A level (`info`) or `tracing` directives (`wharf_proxy=debug,info`); filters logs only.
    pub log_level: String,
    /// The OTLP gRPC collector (`http://collector:4317`); `None`: the `OTEL_*` variables decide.
    pub otlp_endpoint: Option<String>,
    /// `service.name` unless `OTEL_SERVICE_NAME` says otherwise.
    pub service_name: &'static str,
    /// The log writer's queue, in lines.
    pub log_queue_lines: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter {level:?}: {message}")]
    Filter { level: String, message: String },
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    #[error("a global subscriber is already installed: {0}")]
    Init(String),
    #[error("could not start the log writer thread: {0}")]
    LogWriter(String),
}

/// Keeps the tracer provider; [`Telemetry::shutdown`] flushes what is queued.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// Dropped last: writes out the log lines still queued.
    _log_writer: writer::WriterGuard,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is queued (bounded by the exporter's timeout) and stops the exporter, then
    /// writes out the queued log lines. Blocking: call it from `spawn_blocking` or outside the
    /// runtime.
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown_with_timeout(Duration::from_secs(3))
        {
            tracing::debug!(error = %e, "span exporter shutdown");
        }
    }
}

/// Set once spans are exported: without it, propagation is skipped altogether.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (an OpenTelemetry layer is installed).
pub fn enabled() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

tokio::task_local! {
    /// Set while an unsampled request runs: its spans are not built.
    static UNSAMPLED: ();
}

/// The head sampling ratio as `f64` bits; 1.0 (every request) unless a sampler is configured.
static HEAD_RATIO: AtomicU64 = AtomicU64::new(0x3FF0_0000_0000_0000);

/// Whether an incoming `traceparent`'s sampled flag decides (every sampler but `always_off`).
static FOLLOW_PARENT: AtomicBool = AtomicBool::new(true);

/// Whether a request with these headers is traced: the `traceparent`'s sampled flag when it has a
/// valid one (and the sampler follows it), else the head ratio.
pub fn head_sampled(headers: &HeaderMap) -> bool {
    if !enabled() {
        return true;
    }
    let ratio = f64::from_bits(HEAD_RATIO.load(Ordering::Relaxed));
    decide(headers, ratio, FOLLOW_PARENT.load(Ordering::Relaxed))
}

/// [`head_sampled`]'s decision for a given ratio and sampler.
fn decide(headers: &HeaderMap, ratio: f64, follow_parent: bool) -> bool {
    let flags = follow_parent.then(|| headers.get("traceparent")).flatten().and_then(|v| {
        let v = v.to_str().ok()?;
        let parts: Vec<&str> = v.split('-').collect();
        (parts.len() >= 4 && parts[1].len() == 32 && parts[2].len() == 16)
            .then(|| u8::from_str_radix(parts[3], 16).ok())
            .flatten()
    });
    match flags {
        Some(f) => f & 1 == 1,
        None => ratio >= 1.0 || (ratio > 0.0 && rand::random::<f64>() < ratio),
    }
}

/// Runs `fut` (a request's handling) without building spans when it is not `sampled`. Not an
/// `async fn`: that would hold `fut` twice (as its argument and in the scope it awaits).
pub fn unsampled<F: std::future::Future>(sampled: bool, fut: F) -> impl std::future::Future<Output = F::Output> {
    match sampled {
        true => futures_util::future::Either::Left(fut),
        false => futures_util::future::Either::Right(UNSAMPLED.scope((), fut)),
    }
}

/// Disables the spans of requests that are not sampled, for every layer: a layer of its own, not a
/// per-layer filter (a span that only per-layer filters refuse is still built, recorded and closed
/// in the registry, a sixth of a cache hit, and dropped by each layer).
struct SkipUnsampled;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for SkipUnsampled {
    /// Spans are decided one by one, never for their callsite: the first request to reach a
    /// callsite may be one that is not sampled. Events always pass.
    fn register_callsite(&self, meta: &'static tracing::Metadata<'static>) -> tracing::subscriber::Interest {
        match meta.is_span() {
            true => tracing::subscriber::Interest::sometimes(),
            false => tracing::subscriber::Interest::always(),
        }
    }

    fn enabled(&self, meta: &tracing::Metadata<'_>, _: tracing_subscriber::layer::Context<'_, S>) -> bool {
        !(meta.is_span() && UNSAMPLED.try_with(|_| ()).is_ok())
    }
}

/// `fut`, to be spawned, sampled or not like the task spawning it.
pub fn same_sampling<F: std::future::Future>(fut: F) -> impl std::future::Future<Output = F::Output> {
    unsampled(UNSAMPLED.try_with(|_| ()).is_err(), fut)
}

/// The SDK's sampler for the standard variables: a ratio (or `always_off`) becomes the head
/// decision instead, so that requests it leaves out build no span; the others are the SDK's.
fn sampler_from_env() -> Option<Sampler> {
    let name = std::env::var("OTEL_TRACES_SAMPLER").ok()?;
    let (ratio, follow_parent) = head_sampling(&name, std::env::var("OTEL_TRACES_SAMPLER_ARG").ok().as_deref())?;
    HEAD_RATIO.store(ratio.to_bits(), Ordering::Relaxed);
    FOLLOW_PARENT.store(follow_parent, Ordering::Relaxed);
    Some(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
}

/// The head ratio and whether an incoming `traceparent` decides, for a sampler decided at the head.
/// A plain `traceidratio` follows the parent too (a trace is kept or dropped whole).
fn head_sampling(sampler: &str, arg: Option<&str>) -> Option<(f64, bool)> {
    match sampler.trim() {
        "traceidratio" | "parentbased_traceidratio" => {
            let ratio = arg.and_then(|v| v.trim().parse::<f64>().ok()).filter(|r| (0.0..=1.0).contains(r));
            Some((ratio.unwrap_or(1.0), true))
        }
        "parentbased_always_off" => Some((0.0, true)),
        "always_off" => Some((0.0, false)),
        _ => None,
    }
}

/// Spans of these crates are exported (libraries' own spans, the OTLP client's included, are not).
const EXPORTED_TARGETS: &[&str] = &["wharf_proxy", "wharf_control", "wharf_runtime"];

/// Installs the global subscriber (and the W3C propagator). Must run inside a tokio runtime when
/// exporting (the gRPC channel lives on it).
pub fn init(opts: &TelemetryOptions) -> Result<Telemetry, TelemetryError> {
    let filter = tracing_subscriber::EnvFilter::try_new(&opts.log_level)
        .map_err(|e| TelemetryError::Filter { level: opts.log_level.clone(), message: e.to_string() })?;
    // Colours only for a terminal: a log file or a container's log gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let (writer, log_writer) =
        log_writer(opts.log_queue_lines).map_err(|e| TelemetryError::LogWriter(e.to_string()))?;
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(ansi);
    // Log lines carry no span context, text and JSON alike (a line says what it is about in its
    // own fields), so the layer sees events only: otherwise it would format every span's fields
    // when the span is made and again at each `record`, and without an exporter a request's spans
    // would be built for the log alone (together a third of a manifest hit's CPU).
    let events = filter.and(tracing_subscriber::filter::filter_fn(|m| m.is_event()));
    // The text line through faster fields and timestamp, byte for byte the same (see logfmt).
    let fmt = fmt.with_timer(logfmt::Timestamp);
    let fmt = match opts.log_format {
        LogFormat::Json => fmt.json().with_current_span(false).with_span_list(false).with_filter(events).boxed(),
        LogFormat::Text => fmt.fmt_fields(logfmt::Fields).with_filter(events).boxed(),
    };
    let provider = match endpoint(opts.otlp_endpoint.as_deref()) {
        Some(endpoint) => Some(provider(&endpoint, opts.service_name)?),
        None => None,
    };
    let otel = provider.as_ref().map(|p| {
        let targets = tracing_subscriber::filter::Targets::new()
            .with_targets(EXPORTED_TARGETS.iter().map(|t| (*t, tracing::Level::INFO)));
        // No per-span code location, target, thread or busy/idle attributes: they cost more than
        // the request itself on a cache hit (each attribute about 2k instructions: recorded,
        // copied, converted and dropped), and the span names say where they come from. No
        // OpenTelemetry context made current at each enter and exit either: nothing reads it
        // (propagation takes a span's own context).
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("wharf"))
            .with_location(false)
            .with_target(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_filter(targets)
    });
    // Without an exporter, no layer at all in its place: an absent (`None`) layer enables every
    // span, and each request's spans would be built, recorded and closed for nobody.
    let registry = tracing_subscriber::registry().with(fmt);
    match otel {
        Some(otel) => registry.with(otel).with(SkipUnsampled).try_init(),
        None => registry.try_init(),
    }
    .map_err(|e| TelemetryError::Init(e.to_string()))?;
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        EXPORTING.store(true, Ordering::Relaxed);
    }
    Ok(Telemetry { provider, _log_writer: log_writer })
}

/// Log lines are formatted on the thread that logs them and written to stdout by a thread of
/// their own, through a queue of `queue_lines` (see [`writer`]): a request never waits on the
/// write (a slow terminal, pipe or disk must not hold requests). Lines dropped because
/// the queue was full are counted in `wharf_log_lines_dropped_total` and said once a second in the
/// log itself.
fn log_writer(queue_lines: usize) -> std::io::Result<(writer::LogWriter, writer::WriterGuard)> {
    let (writer, guard) = writer::spawn(queue_lines, std::io::stdout(), "wharf-log-writer")?;
    let queue = writer.queue().clone();
    let watch = std::thread::Builder::new().name("wharf-log-drops".into()).spawn(move || {
        let mut reported = 0;
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let now = queue.dropped();
            if now > reported {
                metrics::counter!("wharf_log_lines_dropped_total").increment(now - reported);
                tracing::warn!(
                    dropped = now - reported,
                    total = now,
                    "log lines dropped in the last second: the log writer fell behind"
                );
                reported = now;
            }
        }
    });
    if let Err(e) = watch {
        eprintln!("could not start the thread that reports dropped log lines: {e}");
    }
    Ok((writer, guard))
}

/// The collector to export to, if any: the flag, else the standard variables.
fn endpoint(flag: Option<&str>) -> Option<String> {
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"));
    if disabled {
        return None;
    }
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    flag.map(str::to_owned)
        .filter(|s| !s.trim().is_empty())
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

fn provider(endpoint: &str, service_name: &'static str) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let queue = std::env::var("OTEL_BSP_MAX_QUEUE_SIZE").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(2048);
    let pending = Arc::new(AtomicUsize::new(0));
    let exporter = CountingExporter { inner: exporter, pending: pending.clone() };
    let batch = BatchSpanProcessor::builder(exporter)
        .with_batch_config(BatchConfigBuilder::default().with_max_queue_size(queue).build())
        .build();
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service_name);
    }
    let mut builder = SdkTracerProvider::builder();
    if let Some(sampler) = sampler_from_env() {
        builder = builder.with_sampler(sampler);
    }
    Ok(builder
        .with_span_processor(Bounded { inner: batch, pending, capacity: queue })
        .with_resource(resource.build())
        .build())
}

/// Keeps at most `capacity` spans between `on_end` and their export, dropping (and counting) the
/// rest, so the batch processor's own queue is never full and every drop is counted here.
#[derive(Debug)]
struct Bounded {
    inner: BatchSpanProcessor,
    pending: Arc<AtomicUsize>,
    capacity: usize,
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut Span, cx: &opentelemetry::Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        let admitted = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.capacity).then_some(n + 1))
            .is_ok();
        if admitted {
            self.inner.on_end(span);
        } else {
            metrics::counter!("wharf_spans_dropped_total", "reason" => "queue_full").increment(1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP exporter, counting the spans of failed exports as dropped.
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    pending: Arc<AtomicUsize>,
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        // Out of the queue: room for new spans.
        let _ = self.pending.fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| Some(p.saturating_sub(n)));
        let result = self.inner.export(batch).await;
        if result.is_err() {
            metrics::counter!("wharf_spans_dropped_total", "reason" => "export_failed").increment(n as u64);
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(key.as_bytes()), HeaderValue::from_str(&value)) {
            self.0.insert(k, v);
        }
    }
}

/// Makes `span` continue the trace of an incoming `traceparent` (a no-op without one, or when
/// tracing is off).
pub fn extract(span: &tracing::Span, headers: &HeaderMap) {
    if !enabled() || !headers.contains_key("traceparent") {
        return;
    }
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Adds `span`'s `traceparent` (and `tracestate`) to outgoing `headers`; nothing when tracing is off.
pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
    if !enabled() {
        return;
    }
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
    }
}

/// The trace id of `span` in hex, when tracing is on.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    if !enabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Links `from` to `to` (a client's request to the shared fetch it joined), when tracing is on.
pub fn link(from: &tracing::Span, to: &tracing::Span) {
    if !enabled() {
        return;
    }
    let target = to.context().span().span_context().clone();
    if target.is_valid() {
        from.add_link(target);
    }
}

/// `body` inside `span`: the span lasts until the body ends (or is dropped) and records the bytes
/// it carried in its `bytes` field.
pub fn traced_body<S, E>(
    body: S,
    span: tracing::Span,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, E>> + use<S, E>
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, E>>,
{
    let mut guard = BytesGuard { span, bytes: 0 };
    futures_util::StreamExt::inspect(body, move |chunk| {
        // The whole guard moves into the closure (not just its counter), so it drops with the body.
        let g = &mut guard;
        if let Ok(b) = chunk {
            g.bytes += b.len() as u64;
        }
    })
}

/// Holds a span open for as long as the stream that owns it.
struct BytesGuard {
    span: tracing::Span,
    bytes: u64,
}

impl Drop for BytesGuard {
    fn drop(&mut self) {
        self.span.record("bytes", self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samplers_decided_at_the_head() {
        assert_eq!(head_sampling("parentbased_traceidratio", Some(" 0.25 ")), Some((0.25, true)));
        assert_eq!(head_sampling("traceidratio", Some("0")), Some((0.0, true)));
        // Missing or out of range: every request, as the SDK does.
        assert_eq!(head_sampling("traceidratio", None), Some((1.0, true)));
        assert_eq!(head_sampling("traceidratio", Some("1.5")), Some((1.0, true)));
        assert_eq!(head_sampling("parentbased_always_off", None), Some((0.0, true)));
        assert_eq!(head_sampling("always_off", None), Some((0.0, false)));
        assert_eq!(head_sampling("always_on", None), None);
        assert_eq!(head_sampling("parentbased_always_on", None), None);
    }

    #[test]
    fn the_parent_decides_unless_the_sampler_ignores_it() {
        let with = |flags: &str| {
            let mut h = HeaderMap::new();
            let v = format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}");
            h.insert("traceparent", HeaderValue::from_str(&v).unwrap());
            h
        };
        let none = HeaderMap::new();
        assert!(decide(&with("01"), 0.0, true));
        assert!(!decide(&with("00"), 1.0, true));
        assert!(!decide(&with("01"), 0.0, false), "always_off ignores a sampled parent");
        assert!(!decide(&none, 0.0, true));
        assert!(decide(&none, 1.0, true));
        // A malformed traceparent falls back to the ratio.
        let mut bad = HeaderMap::new();
        bad.insert("traceparent", HeaderValue::from_static("00-xyz-01"));
        assert!(decide(&bad, 1.0, true) && !decide(&bad, 0.0, true));
        let n = (0..4000).filter(|_| decide(&none, 0.25, true)).count();
        assert!((700..1300).contains(&n), "a ratio of 0.25 sampled {n} of 4000");
    }

    /// Installs the global subscriber: nextest runs each test in a process of its own.
    #[test]
    fn without_an_exporter_spans_are_not_built_and_lines_are_written() {
        let opts = TelemetryOptions {
            log_format: LogFormat::Text,
            log_level: "info".into(),
            otlp_endpoint: None,
            service_name: "wharf-test",
            log_queue_lines: 16,
        };
        assert_eq!(endpoint(None), None, "the test environment names an OTLP collector");
        let telemetry = init(&opts).expect("the only subscriber of this process");
        assert!(!telemetry.exporting());
        assert!(tracing::info_span!("wharf.request").is_disabled(), "a span was built with no one to export it");
        assert!(tracing::event_enabled!(tracing::Level::INFO), "info lines are written");
        assert!(!tracing::event_enabled!(tracing::Level::DEBUG));
    }

    #[tokio::test]
    async fn exporting_only_the_spans_of_sampled_requests_are_built() {
        let opts = TelemetryOptions {
            log_format: LogFormat::Json,
            log_level: "info".into(),
            // Nothing listens there: spans are built and their export fails, counted.
            otlp_endpoint: Some("http://127.0.0.1:1".into()),
            service_name: "wharf-test",
            log_queue_lines: 16,
        };
        let telemetry = init(&opts).expect("the only subscriber of this process");
        assert!(telemetry.exporting());
        let built = || async { !tracing::info_span!("wharf.request").is_disabled() };
        for _ in 0..2 {
            assert!(!unsampled(false, built()).await, "a span of a request that is not sampled was built");
            assert!(unsampled(true, built()).await, "a sampled request's span was not built");
        }
        assert!(tracing::event_enabled!(tracing::Level::INFO));
        assert!(unsampled(false, async { tracing::event_enabled!(tracing::Level::INFO) }).await);
    }
}
