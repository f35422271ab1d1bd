//! Log output: plain text (coloured only on a terminal) or one flat JSON object per line.
//!
//! The JSON lines put the fields of every enclosing span and of the event side by side at the
//! top level (`namespace`, `name`, `lease_id`, `error`, …), with the innermost span's name under
//! `span`: tracing-subscriber's own JSON format nests span fields and writes the span's name
//! under `name`, which a JSON parser then confuses with the GrpcService's `name`. Numbers and
//! booleans stay JSON numbers and booleans; everything else is a string in its Display form.

use std::fmt;
use std::io::IsTerminal;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Human-readable lines; ANSI colour only when stdout is a terminal.
    Plain,
    /// One JSON object per line.
    Json,
}

/// The level filter: `RUST_LOG` when set, else `info`. kube's client builder logs every failed
/// request at error level; the controller logs the same failure once, with what it does next,
/// so that logger is off by default.
#[must_use]
pub fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,kube_client::client::builder=off"))
}

/// Installs the global subscriber, writing to stdout.
pub fn init(format: Format) {
    let builder = tracing_subscriber::fmt().with_env_filter(filter());
    match format {
        Format::Plain => builder.with_ansi(std::io::stdout().is_terminal()).init(),
        Format::Json => builder
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .init(),
    }
}

/// The JSON event format described in the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub struct FlatJson;

impl<S> FormatEvent<S, JsonFields> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut fields = Map::new();
        fields.insert(
            "timestamp".into(),
            k8s_openapi::jiff::Timestamp::now().to_string().into(),
        );
        fields.insert("level".into(), meta.level().as_str().into());
        fields.insert("target".into(), meta.target().into());
        if let Some(scope) = ctx.event_scope() {
            let mut innermost = None;
            for span in scope.from_root() {
                innermost = Some(span.name());
                let extensions = span.extensions();
                if let Some(recorded) = extensions.get::<FormattedFields<JsonFields>>()
                    && let Ok(Value::Object(span_fields)) =
                        serde_json::from_str::<Value>(&recorded.fields)
                {
                    fields.extend(span_fields);
                }
            }
            if let Some(name) = innermost {
                fields.insert("span".into(), name.into());
            }
        }
        event.record(&mut Visitor(&mut fields));
        let line = serde_json::to_string(&Value::Object(fields)).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

/// Records event fields into a JSON map, keeping numbers and booleans typed.
struct Visitor<'a>(&'a mut Map<String, Value>);

impl Visit for Visitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().into(), crate::error::chain(value).into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `%value` arrives here as a Display wrapper, and `message` as format arguments: both
        // print as plain text.
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing::{info, info_span, warn};
    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Self;
        fn make_writer(&'a self) -> Self {
            self.clone()
        }
    }

    fn lines(emit: impl FnOnce()) -> Vec<Value> {
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(buffer.clone())
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let out = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    #[test]
    fn json_lines_keep_the_services_name_and_put_span_fields_at_the_top_level() {
        let lines = lines(|| {
            let span = info_span!(
                "reconcile",
                namespace = tracing::field::Empty,
                name = "greeter"
            );
            let _entered = span.enter();
            span.record("namespace", "shop");
            info!(puts = 3_u64, revision = 42_i64, lease_id = %format!("{:x}", 0x7a3b_u64), healthy = true, "registry updated");
        });
        assert_eq!(lines.len(), 1);
        let line = &lines[0];
        assert_eq!(line["name"], "greeter", "{line}");
        assert_eq!(line["namespace"], "shop");
        assert_eq!(line["span"], "reconcile");
        assert_eq!(line["message"], "registry updated");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["puts"], 3);
        assert_eq!(line["revision"], 42);
        assert_eq!(
            line["lease_id"], "7a3b",
            "hex string, not a number jq rounds"
        );
        assert_eq!(line["healthy"], true);
        assert!(line["timestamp"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn errors_and_display_values_are_plain_text_not_debug_structures() {
        let error = crate::registry::Error::Timeout {
            op: "txn",
            after: std::time::Duration::from_secs(5),
        };
        let lines = lines(|| {
            warn!(error = %error, endpoints = %"http://a:2379,http://b:2379", "etcd unreachable");
            warn!(
                error = &error as &(dyn std::error::Error + 'static),
                "as an error value"
            );
        });
        assert_eq!(lines[0]["error"], "failed to txn: no answer within 5s");
        assert_eq!(lines[0]["endpoints"], "http://a:2379,http://b:2379");
        assert_eq!(lines[1]["error"], "failed to txn: no answer within 5s");
        assert!(lines.iter().all(|l| l.get("span").is_none()));
    }
}
