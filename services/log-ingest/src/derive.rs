//! Prometheus metrics derived from the records themselves (after masking): records by
//! service and level, exceptions by class, and from access logs, requests by status and a
//! response-time histogram. Every label value comes from a bounded set: services and
//! exception classes past their limits count under `other`; statuses are three digits.
//!
//! A record with a trace id leaves it as the exemplar of the series (or histogram bucket)
//! it incremented, so a spike on a Grafana panel links to a trace that caused it.

// foldhash, not SipHash: these maps are looked up for every record, and each is capped.
use foldhash::{HashMap, HashMapExt as _, HashSet, HashSetExt as _};

use mall_telemetry::metrics::{
    ExemplarCounter, ExemplarCounterVec, ExemplarHistogram, ExemplarHistogramVec, HistogramOpts,
    Opts, Registry,
};
use serde::{Deserialize, Serialize};

use crate::record::{Level, Record};

/// Stands for label values past a limit.
const OTHER: &str = "other";

/// The unit of an access log's time taken (`duration`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DurationUnit {
    /// Seconds (`%T`).
    S,
    /// Milliseconds (Tomcat 9's `%D`).
    Ms,
    /// Microseconds (Tomcat 10's `%D`).
    Us,
}

/// What is derived, and its limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DerivedSettings {
    /// Most services with series of their own; later ones count as `other`. Default 100.
    pub max_services: usize,
    /// Most (service, exception class) pairs with series of their own; later ones count
    /// as class `other`. Default 500.
    pub max_exception_classes: usize,
    /// Unit of the access logs' time taken. Default `ms` (Tomcat 9's `%D`).
    pub duration_unit: DurationUnit,
    /// Upper bounds of the response-time histogram, seconds.
    pub duration_buckets: Vec<f64>,
}

impl Default for DerivedSettings {
    fn default() -> Self {
        Self {
            max_services: 100,
            max_exception_classes: 500,
            duration_unit: DurationUnit::Ms,
            duration_buckets: vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
        }
    }
}

/// The derived metrics and their bookkeeping (only the pipeline's task uses it).
#[derive(Debug)]
pub struct Deriver {
    settings: DerivedSettings,
    records: ExemplarCounterVec,
    exceptions: ExemplarCounterVec,
    requests: ExemplarCounterVec,
    durations: ExemplarHistogramVec,
    services: HashSet<String>,
    classes: HashSet<(String, String)>,
    /// Counters already looked up, by service and level (unknown last): the hot path
    /// hashes one name and allocates nothing.
    record_counters: HashMap<String, [Option<ExemplarCounter>; 7]>,
    duration_histograms: HashMap<String, ExemplarHistogram>,
}

impl Deriver {
    /// Registers the derived metrics in `registry`.
    ///
    /// # Errors
    /// When they are registered already or a setting is unusable.
    pub fn register(
        registry: &Registry,
        settings: DerivedSettings,
    ) -> mall_telemetry::metrics::Result<Self> {
        let records = ExemplarCounterVec::new(
            Opts::new(
                "log_records_total",
                "Records shipped, by service and level; the rest of one cut from its head (caps, quiet, memory) not again",
            ),
            &["service_name", "level"],
        )?;
        let exceptions = ExemplarCounterVec::new(
            Opts::new(
                "log_exceptions_total",
                "Records with a stack trace, by service and exception class",
            ),
            &["service_name", "exception"],
        )?;
        let requests = ExemplarCounterVec::new(
            Opts::new(
                "http_requests_total",
                "Requests in access logs, by service and status",
            ),
            &["service_name", "status"],
        )?;
        let durations = ExemplarHistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "Time taken per request in access logs, by service",
            )
            .buckets(settings.duration_buckets.clone()),
            &["service_name"],
        )?;
        // Present from the start, as every other metric is (dashboards and rules find the
        // names before the first record): the `other` series, at zero.
        for level in [
            "TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL", "unknown",
        ] {
            records.with_label_values(&[OTHER, level]);
        }
        exceptions.with_label_values(&[OTHER, OTHER]);
        requests.with_label_values(&[OTHER, "200"]);
        durations.with_label_values(&[OTHER]);
        registry.register(Box::new(records.clone()))?;
        registry.register(Box::new(exceptions.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(durations.clone()))?;
        Ok(Self {
            settings,
            records,
            exceptions,
            requests,
            durations,
            services: HashSet::new(),
            classes: HashSet::new(),
            record_counters: HashMap::new(),
            duration_histograms: HashMap::new(),
        })
    }

    /// Counts one record of `service` that Loki accepted.
    pub fn observe(&mut self, seen: &Observation, service: &str) {
        let service = self.service(service);
        // The rest of a record cut from its head is no record of its own (its exception,
        // when it begins with one, is counted: the head had none).
        if !seen.continued {
            let level = seen.level.map_or("unknown", |l| l.as_str());
            let slot = seen.level.map_or(6, |l| l as usize);
            if !self.record_counters.contains_key(service) {
                self.record_counters
                    .insert(service.to_owned(), Default::default());
            }
            let counters = self
                .record_counters
                .get_mut(service)
                .expect("inserted above");
            counters[slot]
                .get_or_insert_with(|| self.records.with_label_values(&[service, level]))
                .inc(&seen.trace_id);
        }
        if let Some(class) = seen.exception.as_deref() {
            // A runaway "class" (a first line of 100 KB of letters) would weigh on every
            // scrape, as a runaway service name would.
            let class = if class.len() > crate::labels::MAX_VALUE_BYTES {
                OTHER
            } else {
                let key = (service.to_owned(), class.to_owned());
                if self.classes.contains(&key) {
                    class
                } else if self.classes.len() < self.settings.max_exception_classes {
                    self.classes.insert(key);
                    class
                } else {
                    OTHER
                }
            };
            self.exceptions
                .with_label_values(&[service, class])
                .inc(&seen.trace_id);
        }
        if let Some((status, duration)) = &seen.request {
            self.requests
                .with_label_values(&[service, status])
                .inc(&seen.trace_id);
            if let Some(seconds) = duration.map(|d| match self.settings.duration_unit {
                DurationUnit::S => d,
                DurationUnit::Ms => d / 1e3,
                DurationUnit::Us => d / 1e6,
            }) {
                self.duration_histograms
                    .entry(service.to_owned())
                    .or_insert_with(|| self.durations.with_label_values(&[service]))
                    .observe(seconds, &seen.trace_id);
            }
        }
    }

    /// `service`, or `other` past the limit.
    fn service<'a>(&mut self, service: &'a str) -> &'a str {
        // A runaway name (an OTLP `service.name` of megabytes) would weigh on every scrape.
        if service.len() > crate::labels::MAX_VALUE_BYTES {
            return OTHER;
        }
        if self.services.contains(service) {
            return service;
        }
        if self.services.len() < self.settings.max_services {
            self.services.insert(service.to_owned());
            return service;
        }
        OTHER
    }
}

/// What a record adds to the derived metrics: taken when its push is prepared (after
/// masking), counted once Loki has accepted it, so a push cancelled by a shutdown, replayed
/// after a crash or refused by Loki is not counted as shipped.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    level: Option<Level>,
    exception: Option<String>,
    /// An HTTP request's status and time taken (in `derived.duration_unit`): of any record
    /// with a `method` field and a three-digit `status` (access logs; JSON, logfmt or regex
    /// records carrying both).
    request: Option<(String, Option<f64>)>,
    trace_id: String,
    /// [`Record::continued`].
    continued: bool,
}

impl Observation {
    /// What `record` adds.
    pub fn of(record: &Record) -> Self {
        let request = record
            .fields
            .get("status")
            // An HTTP status (100–599): the label's values stay bounded.
            .filter(|s| matches!(s.as_bytes(), [b'1'..=b'5', b'0'..=b'9', b'0'..=b'9']))
            .filter(|_| record.fields.contains_key("method"))
            .map(|status| {
                let duration = record
                    .fields
                    .get("duration")
                    .and_then(|d| d.parse::<f64>().ok())
                    .filter(|d| d.is_finite() && *d >= 0.0);
                (status.clone(), duration)
            });
        Self {
            level: record.level,
            exception: exception_class(&record.stack_trace).map(str::to_owned),
            request,
            trace_id: record.trace_id.clone(),
            continued: record.continued,
        }
    }
}

/// The class of the exception a stack trace starts with (`java.lang.IllegalStateException`
/// of `java.lang.IllegalStateException: broken`); `None` without a stack trace or when its
/// first line names no class.
pub fn exception_class(stack_trace: &str) -> Option<&str> {
    let first = stack_trace.lines().next()?.trim_start();
    let first = first
        .strip_prefix("Exception in thread \"")
        .and_then(|rest| rest.split_once("\" "))
        .map_or(first, |(_, rest)| rest);
    let end = first
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '$'))
        .unwrap_or(first.len());
    let class = &first[..end];
    (class.contains('.') && class.starts_with(|c: char| c.is_ascii_alphabetic())).then_some(class)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    #[test]
    fn exception_classes_from_the_first_line() {
        assert_eq!(
            exception_class("java.lang.IllegalStateException: broken\n\tat x.Y.z(Y.java:1)"),
            Some("java.lang.IllegalStateException")
        );
        assert_eq!(
            exception_class("Exception in thread \"main\" java.lang.OutOfMemoryError: heap"),
            Some("java.lang.OutOfMemoryError")
        );
        assert_eq!(
            exception_class("de.hybris.Foo$BarException"),
            Some("de.hybris.Foo$BarException")
        );
        assert_eq!(exception_class(""), None);
        assert_eq!(exception_class("\tat x.Y.z(Y.java:1)"), None);
    }

    /// The sample `name{labels…}` in the exposition, with its exemplar's text if any.
    fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<(f64, String)> {
        text.lines()
            .filter(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with('{')))
            .find(|l| {
                labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
            })
            .map(|l| {
                let (sample, exemplar) = l.split_once(" # ").unwrap_or((l, ""));
                let value = sample.rsplit(' ').next().and_then(|v| v.parse().ok());
                (value.unwrap_or(f64::NAN), exemplar.to_owned())
            })
    }

    /// The rest of a record cut from its head (a cap, the quiet) is not counted as a record
    /// again; an exception it begins with is (its head, cut at a cap before its stack trace
    /// began, had none).
    #[test]
    fn the_rest_of_a_cut_record_counts_its_exception_not_itself() {
        let registry = Registry::new();
        let mut deriver =
            Deriver::register(&registry, DerivedSettings::default()).expect("registers");
        let head = Record {
            level: Some(Level::Error),
            message: "cart 8812 failed".to_owned(),
            ..Record::default()
        };
        let rest = Record {
            level: Some(Level::Error),
            stack_trace: "java.lang.IllegalStateException: broken\n\tat a.B.c(B.java:1)".to_owned(),
            continued: true,
            ..Record::default()
        };
        for record in [&head, &rest] {
            deriver.observe(&Observation::of(record), "hybris");
        }
        let text = registry.encode();
        let records = [("service_name", "hybris"), ("level", "ERROR")];
        assert_eq!(
            sample(&text, "log_records_total", &records).map(|s| s.0),
            Some(1.0)
        );
        let exceptions = [
            ("service_name", "hybris"),
            ("exception", "java.lang.IllegalStateException"),
        ];
        assert_eq!(
            sample(&text, "log_exceptions_total", &exceptions).map(|s| s.0),
            Some(1.0)
        );
    }

    /// A service name longer than a label value may be is counted as `other`.
    #[test]
    fn a_runaway_service_name_is_counted_as_other() {
        let registry = Registry::new();
        let mut deriver =
            Deriver::register(&registry, DerivedSettings::default()).expect("registers");
        let record = Record {
            level: Some(Level::Info),
            ..Record::default()
        };
        let long = "s".repeat(crate::labels::MAX_VALUE_BYTES + 1);
        deriver.observe(&Observation::of(&record), &long);
        let text = registry.encode();
        let other = [("service_name", "other"), ("level", "INFO")];
        assert_eq!(
            sample(&text, "log_records_total", &other).map(|s| s.0),
            Some(1.0)
        );
        assert!(!text.contains(&long));
    }

    /// An exception class longer than a label value may be is counted as `other`, and
    /// takes none of the classes' places.
    #[test]
    fn a_runaway_exception_class_is_counted_as_other() {
        let registry = Registry::new();
        let mut deriver = Deriver::register(
            &registry,
            DerivedSettings {
                max_exception_classes: 1,
                ..DerivedSettings::default()
            },
        )
        .expect("registers");
        let long = format!("a.{}", "B".repeat(crate::labels::MAX_VALUE_BYTES));
        for first_line in [format!("{long}: x"), "java.lang.Boom: y".to_owned()] {
            let record = Record {
                level: Some(Level::Error),
                stack_trace: format!("{first_line}\n\tat a.B.c(B.java:1)"),
                ..Record::default()
            };
            deriver.observe(&Observation::of(&record), "hybris");
        }
        let text = registry.encode();
        assert!(!text.contains(&long));
        for class in ["other", "java.lang.Boom"] {
            let labels = [("service_name", "hybris"), ("exception", class)];
            assert_eq!(
                sample(&text, "log_exceptions_total", &labels).map(|s| s.0),
                Some(1.0),
                "{class}: {text}"
            );
        }
    }

    #[test]
    fn records_exceptions_and_requests_are_counted_with_bounded_labels_and_exemplars() {
        let registry = Registry::new();
        let mut deriver = Deriver::register(
            &registry,
            DerivedSettings {
                max_services: 2,
                max_exception_classes: 1,
                ..DerivedSettings::default()
            },
        )
        .expect("registers");
        let error = Record {
            level: Some(Level::Error),
            stack_trace: "java.lang.IllegalStateException: broken".to_owned(),
            trace_id: TRACE.to_owned(),
            ..Record::default()
        };
        deriver.observe(&Observation::of(&error), "hybris");
        deriver.observe(&Observation::of(&error), "hybris");
        let other_class = Record {
            stack_trace: "java.io.IOException: gone".to_owned(),
            ..error.clone()
        };
        deriver.observe(&Observation::of(&other_class), "hybris");
        let mut access = Record {
            level: Some(Level::Info),
            ..Record::default()
        };
        for (k, v) in [("method", "GET"), ("status", "200"), ("duration", "250")] {
            access.fields.insert(k.to_owned(), v.to_owned());
        }
        deriver.observe(&Observation::of(&access), "tomcat");
        deriver.observe(&Observation::of(&access), "third-service");
        // Only an HTTP status (100–599) is one: the label stays bounded.
        for status in ["999", "099", "+20", "2000"] {
            let mut odd = access.clone();
            odd.fields.insert("status".to_owned(), status.to_owned());
            assert!(
                Observation::of(&odd).request.is_none(),
                "{status} is not a status"
            );
        }

        let text = registry.encode();
        let v = |name, labels: &[(&str, &str)]| sample(&text, name, labels).map(|s| s.0);
        assert_eq!(
            v(
                "log_records_total",
                &[("service_name", "hybris"), ("level", "ERROR")]
            ),
            Some(3.0)
        );
        let (count, exemplar) = sample(
            &text,
            "log_exceptions_total",
            &[
                ("service_name", "hybris"),
                ("exception", "java.lang.IllegalStateException"),
            ],
        )
        .expect("a series");
        assert_eq!(count, 2.0);
        assert_eq!(exemplar, format!("{{trace_id=\"{TRACE}\"}} 1.0"));
        assert_eq!(
            v(
                "log_exceptions_total",
                &[("service_name", "hybris"), ("exception", "other")]
            ),
            Some(1.0)
        );
        assert_eq!(
            v(
                "http_requests_total",
                &[("service_name", "tomcat"), ("status", "200")]
            ),
            Some(1.0)
        );
        assert_eq!(
            v(
                "http_requests_total",
                &[("service_name", "other"), ("status", "200")]
            ),
            Some(1.0)
        );
        assert_eq!(
            v(
                "http_request_duration_seconds_count",
                &[("service_name", "tomcat")]
            ),
            Some(1.0)
        );
        assert_eq!(
            v(
                "http_request_duration_seconds_sum",
                &[("service_name", "tomcat")]
            ),
            Some(0.25),
            "250 ms"
        );
        // Untraced records leave no exemplar.
        let (_, none) =
            sample(&text, "http_requests_total", &[("service_name", "tomcat")]).expect("a series");
        assert_eq!(none, "");
    }
}
