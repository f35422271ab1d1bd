//! Log output: short plain-text lines (coloured only on a terminal) or one flat JSON object per
//! line.
//!
//! Both formats put the fields of every enclosing span and of the event side by side
//! (`namespace`, `name`, `registry_target`, `lease_id`, `error`, …), the event's own first:
//!
//! - JSON lines carry them at the top level, with the innermost span's name under `span` and
//!   tracing's module path under `target` (tracing-subscriber's own JSON format nests span
//!   fields and writes the span's name under `name`, which a JSON parser then confuses with the
//!   GrpcService's `name`). Numbers and booleans stay JSON numbers and booleans; everything else
//!   is a string in its Display form. A field is named for one thing and has one type: the
//!   registry prefix is `registry_target`, never `target`, and `endpoints` is always a count.
//! - Plain lines are `<time> <LEVEL> <message> key=value…`: no span names, no module path for
//!   the controller's own lines, and not kube-runtime's `object.ref` (the `namespace` and `name`
//!   fields say it), so the message comes first instead of after ~300 characters of prefix.

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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .fmt_fields(JsonFields::new());
    match format {
        Format::Plain => builder
            .with_ansi(std::io::stdout().is_terminal())
            .event_format(Plain)
            .init(),
        Format::Json => builder.with_ansi(false).event_format(FlatJson).init(),
    }
}

/// The fields of an event and of its enclosing spans, the event's first, then the spans' from
/// the innermost out; a name already present is not repeated (the innermost value wins).
/// Returns them with the innermost span's name.
fn fields<S>(
    ctx: &FmtContext<'_, S, JsonFields>,
    event: &Event<'_>,
) -> (Vec<(String, Value)>, Option<&'static str>)
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let mut fields = Vec::new();
    event.record(&mut Visitor(&mut fields));
    let mut innermost = None;
    if let Some(scope) = ctx.event_scope() {
        for span in scope {
            innermost.get_or_insert(span.name());
            let extensions = span.extensions();
            if let Some(recorded) = extensions.get::<FormattedFields<JsonFields>>()
                && let Ok(Value::Object(span_fields)) =
                    serde_json::from_str::<Value>(&recorded.fields)
            {
                for (key, value) in span_fields {
                    if !fields.iter().any(|(k, _)| *k == key) {
                        fields.push((key, value));
                    }
                }
            }
        }
    }
    (fields, innermost)
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
        let (recorded, span) = fields(ctx, event);
        let mut line: Map<String, Value> = recorded.into_iter().collect();
        line.insert(
            "timestamp".into(),
            k8s_openapi::jiff::Timestamp::now().to_string().into(),
        );
        line.insert("level".into(), meta.level().as_str().into());
        // Written last: tracing's module path, whatever a field is called.
        line.insert("target".into(), meta.target().into());
        if let Some(name) = span {
            line.insert("span".into(), name.into());
        }
        let line = serde_json::to_string(&Value::Object(line)).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

/// The plain-text event format described in the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Plain;

/// Span fields left out of plain lines: kube-runtime's object reference repeats `namespace`
/// and `name`.
const PLAIN_OMITTED: [&str; 1] = ["object.ref"];

impl<S> FormatEvent<S, JsonFields> for Plain
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
        let (mut recorded, _) = fields(ctx, event);
        let now = k8s_openapi::jiff::Timestamp::now();
        let level = meta.level().as_str();
        if writer.has_ansi_escapes() {
            let colour = match *meta.level() {
                tracing::Level::ERROR => 31,
                tracing::Level::WARN => 33,
                tracing::Level::INFO => 32,
                tracing::Level::DEBUG => 34,
                tracing::Level::TRACE => 35,
            };
            write!(
                writer,
                "\x1b[2m{now:.3}\x1b[0m \x1b[{colour}m{level:>5}\x1b[0m"
            )?;
        } else {
            write!(writer, "{now:.3} {level:>5}")?;
        }
        if let Some(at) = recorded.iter().position(|(k, _)| k == "message") {
            let (_, message) = recorded.remove(at);
            match message {
                Value::String(text) => write!(writer, " {text}")?,
                other => write!(writer, " {other}")?,
            }
        }
        // The controller's own lines need no module; a dependency's say which one it is.
        if !meta.target().starts_with("grpc_registrar") {
            recorded.push(("target".into(), meta.target().into()));
        }
        for (key, value) in recorded {
            if PLAIN_OMITTED.contains(&key.as_str()) {
                continue;
            }
            write!(writer, " {key}=")?;
            match value {
                Value::String(text) if needs_quotes(&text) => write!(writer, "{text:?}")?,
                Value::String(text) => writer.write_str(&text)?,
                other => write!(writer, "{other}")?,
            }
        }
        writeln!(writer)
    }
}

/// Whether a plain value must be quoted to stay one `key=value` token.
fn needs_quotes(text: &str) -> bool {
    text.is_empty() || text.contains(|c: char| c.is_whitespace() || c == '"' || c == '=')
}

/// Records event fields, keeping numbers and booleans typed.
struct Visitor<'a>(&'a mut Vec<(String, Value)>);

impl Visitor<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        self.0.push((field.name().to_owned(), value));
    }
}

impl Visit for Visitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, crate::error::chain(value).into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `%value` arrives here as a Display wrapper, and `message` as format arguments: both
        // print as plain text.
        self.put(field, format!("{value:?}").into());
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

    fn output<F>(format: F, emit: impl FnOnce()) -> String
    where
        F: FormatEvent<tracing_subscriber::Registry, JsonFields> + Send + Sync + 'static,
    {
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(buffer.clone())
            .with_ansi(false)
            .fmt_fields(JsonFields::new())
            .event_format(format)
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    fn lines(emit: impl FnOnce()) -> Vec<Value> {
        output(FlatJson, emit)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// A reconcile line as the controller writes one: kube-runtime's span, then the reconcile
    /// span with the service's fields.
    fn reconcile_line() {
        let kube = info_span!(
            "reconciling object",
            "object.ref" = "GrpcService.v1alpha1.grpc-registrar.io/greeter.shop",
            object.reason = "object updated"
        );
        let _kube = kube.enter();
        let span = info_span!(
            "reconcile",
            namespace = "shop",
            name = "greeter",
            registry_target = "services/shop/greeter"
        );
        let _entered = span.enter();
        info!(puts = 3_u64, endpoints = 2_u64, "registry updated");
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
            warn!(error = %error, registry_address = %"http://a:2379,http://b:2379", "registry unreachable");
            warn!(
                error = &error as &(dyn std::error::Error + 'static),
                "as an error value"
            );
        });
        assert_eq!(lines[0]["error"], "failed to txn: no answer within 5s");
        assert_eq!(lines[0]["registry_address"], "http://a:2379,http://b:2379");
        assert_eq!(lines[1]["error"], "failed to txn: no answer within 5s");
        assert!(lines.iter().all(|l| l.get("span").is_none()));
    }

    #[test]
    fn json_target_is_always_the_module_and_the_registry_prefix_is_registry_target() {
        let reconcile = lines(reconcile_line);
        let line = &reconcile[0];
        assert_eq!(line["target"], module_path!(), "{line}");
        assert_eq!(line["registry_target"], "services/shop/greeter");
        assert_eq!(line["endpoints"], 2, "a count is a number");
        assert_eq!(line["span"], "reconcile");
        assert_eq!(line["name"], "greeter");
        // Even a field that takes the name cannot hide the module.
        let stray = lines(|| info!(target = "services/x", "a stray field"));
        assert_eq!(stray[0]["target"], module_path!());
    }

    #[test]
    fn plain_lines_start_with_the_message_and_carry_the_fields_after_it() {
        let out = output(Plain, reconcile_line);
        let line = out.lines().next().unwrap();
        let (time, rest) = line.split_once(' ').unwrap();
        assert!(time.ends_with('Z') && time.len() <= 24, "{line}");
        assert!(
            rest.starts_with(" INFO registry updated puts=3 endpoints=2 "),
            "{line}"
        );
        for field in [
            "namespace=shop",
            "name=greeter",
            "registry_target=services/shop/greeter",
            "object.reason=\"object updated\"",
        ] {
            assert!(line.contains(field), "{field} missing: {line}");
        }
        assert!(!line.contains("object.ref"), "{line}");
        assert!(!line.contains("reconcile{"), "no span prefix: {line}");
        assert!(line.len() < 200, "{} characters: {line}", line.len());
    }

    #[test]
    fn plain_lines_of_dependencies_name_their_module() {
        let out = output(
            Plain,
            || warn!(target: "kube_runtime::watcher", "watch failed"),
        );
        assert!(
            out.trim_end()
                .ends_with("WARN watch failed target=kube_runtime::watcher"),
            "{out}"
        );
    }
}
