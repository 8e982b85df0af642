//! An in-process OTLP collector: a tonic `TraceService` on 127.0.0.1:0 that records every span
//! exported to it, for asserting span trees (or, for benchmarks, only counts them).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::{AnyValue as Any, KeyValue};
use tokio::net::TcpListener;

/// One exported span, ids in lowercase hex, attribute values as strings.
#[derive(Debug, Clone)]
pub struct RecordedSpan {
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// `SpanKind` as in the proto (2 = server, 3 = client).
    pub kind: i32,
    /// `Status.code` as in the proto (0 = unset, 1 = ok, 2 = error).
    pub status: i32,
    pub attributes: BTreeMap<String, String>,
    /// `(trace_id, span_id)` of each link.
    pub links: Vec<(String, String)>,
}

impl RecordedSpan {
    /// An attribute's value.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// The collector; stops serving when dropped.
pub struct Collector {
    addr: SocketAddr,
    recorder: Recorder,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone, Default)]
struct Recorder {
    /// `None`: spans are only counted.
    spans: Option<Arc<Mutex<Vec<RecordedSpan>>>>,
    received: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl TraceService for Recorder {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let request = request.into_inner();
        let n: usize = request.resource_spans.iter().flat_map(|rs| &rs.scope_spans).map(|ss| ss.spans.len()).sum();
        self.received.fetch_add(n, Ordering::Relaxed);
        let Some(spans) = &self.spans else {
            return Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }));
        };
        let mut out = Vec::new();
        for rs in request.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| attrs(&r.attributes).get("service.name").cloned())
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(RecordedSpan {
                        service: service.clone(),
                        name: s.name,
                        trace_id: hex::encode(&s.trace_id),
                        span_id: hex::encode(&s.span_id),
                        parent_span_id: hex::encode(&s.parent_span_id),
                        kind: s.kind,
                        status: s.status.as_ref().map_or(0, |st| st.code),
                        attributes: attrs(&s.attributes),
                        links: s.links.iter().map(|l| (hex::encode(&l.trace_id), hex::encode(&l.span_id))).collect(),
                    });
                }
            }
        }
        spans.lock().unwrap_or_else(|e| e.into_inner()).extend(out);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter().map(|kv| (kv.key.clone(), kv.value.as_ref().map(value).unwrap_or_default())).collect()
}

fn value(v: &Any) -> String {
    match &v.value {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

impl Collector {
    /// Starts serving on 127.0.0.1:0, recording every span.
    pub async fn start() -> anyhow::Result<Self> {
        Self::serve(Recorder { spans: Some(Arc::default()), ..Recorder::default() }).await
    }

    /// Starts serving on 127.0.0.1:0, decoding each export (as any collector must) and counting
    /// its spans, keeping none: for benchmarks, where recording every span as a map of strings
    /// (and holding them all) would cost more on the shared cores than what is measured.
    pub async fn start_counting() -> anyhow::Result<Self> {
        Self::serve(Recorder::default()).await
    }

    async fn serve(recorder: Recorder) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let router = tonic::service::Routes::new(TraceServiceServer::new(recorder.clone())).into_axum_router();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(Self { addr, recorder, task })
    }

    /// `http://127.0.0.1:<port>`, for `--otlp-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far (none from a counting collector).
    pub fn spans(&self) -> Vec<RecordedSpan> {
        let spans = self.recorder.spans.as_ref();
        spans.map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone()).unwrap_or_default()
    }

    /// How many spans were received so far.
    pub fn received(&self) -> usize {
        self.recorder.received.load(Ordering::Relaxed)
    }

    /// Polls until `done(spans)` holds; returns the spans then.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&[RecordedSpan]) -> bool,
    ) -> anyhow::Result<Vec<RecordedSpan>> {
        let result = crate::wait_until_async(timeout, what, || {
            let spans = self.spans();
            done(&spans).then_some(spans)
        })
        .await;
        result.map_err(|e| {
            let names: Vec<String> =
                self.spans().iter().map(|s| format!("{} {} <- {}", s.name, s.span_id, s.parent_span_id)).collect();
            e.context(format!("spans received: {names:#?}"))
        })
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}
