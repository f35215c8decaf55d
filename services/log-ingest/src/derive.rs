//! Prometheus metrics derived from the records themselves (after masking): records by
//! service and level, exceptions by class, and from access logs, requests by status and a
//! response-time histogram. Every label value comes from a bounded set: services and
//! exception classes past their limits count under `other`; statuses are three digits.
//!
//! Not yet: exemplars (a record's trace id on the sample it incremented). The `prometheus`
//! crate the services share cannot expose them; that needs the whole workspace on
//! `prometheus-client` (OpenMetrics), which is a change of its own.

use std::collections::{HashMap, HashSet};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};
use serde::{Deserialize, Serialize};

use crate::record::Record;

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
    records: IntCounterVec,
    exceptions: IntCounterVec,
    requests: IntCounterVec,
    durations: HistogramVec,
    services: HashSet<String>,
    classes: HashSet<(String, String)>,
    /// Counters already looked up, by service and level (unknown last): the hot path
    /// hashes one name and allocates nothing.
    record_counters: HashMap<String, [Option<IntCounter>; 7]>,
    duration_histograms: HashMap<String, Histogram>,
}

impl Deriver {
    /// Registers the derived metrics in `registry`.
    ///
    /// # Errors
    /// When they are registered already or a setting is unusable.
    pub fn register(registry: &Registry, settings: DerivedSettings) -> prometheus::Result<Self> {
        let records = IntCounterVec::new(
            Opts::new("log_records_total", "Records shipped, by service and level"),
            &["service", "level"],
        )?;
        let exceptions = IntCounterVec::new(
            Opts::new(
                "log_exceptions_total",
                "Records with a stack trace, by service and exception class",
            ),
            &["service", "exception"],
        )?;
        let requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "Requests in access logs, by service and status",
            ),
            &["service", "status"],
        )?;
        let durations = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "Time taken per request in access logs, by service",
            )
            .buckets(settings.duration_buckets.clone()),
            &["service"],
        )?;
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

    /// Counts one record (masked already) of `service`.
    pub fn observe(&mut self, record: &Record, service: &str) {
        let service = self.service(service);
        let level = record.level.map_or("unknown", |l| l.as_str());
        let slot = record.level.map_or(6, |l| l as usize);
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
            .inc();
        if let Some(class) = exception_class(&record.stack_trace) {
            let key = (service.to_owned(), class.to_owned());
            let class = if self.classes.contains(&key) {
                class
            } else if self.classes.len() < self.settings.max_exception_classes {
                self.classes.insert(key);
                class
            } else {
                OTHER
            };
            self.exceptions.with_label_values(&[service, class]).inc();
        }
        if let Some(status) = record
            .fields
            .get("status")
            .filter(|s| s.len() == 3 && s.bytes().all(|b| b.is_ascii_digit()))
            && record.fields.contains_key("method")
        {
            self.requests.with_label_values(&[service, status]).inc();
            if let Some(seconds) = record
                .fields
                .get("duration")
                .and_then(|d| d.parse::<f64>().ok())
                .filter(|d| d.is_finite() && *d >= 0.0)
                .map(|d| match self.settings.duration_unit {
                    DurationUnit::S => d,
                    DurationUnit::Ms => d / 1e3,
                    DurationUnit::Us => d / 1e6,
                })
            {
                self.duration_histograms
                    .entry(service.to_owned())
                    .or_insert_with(|| self.durations.with_label_values(&[service]))
                    .observe(seconds);
            }
        }
    }

    /// `service`, or `other` past the limit.
    fn service<'a>(&mut self, service: &'a str) -> &'a str {
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
    use crate::record::Level;

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

    fn value(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
        registry
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().iter())
            .filter(|m| {
                labels.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == *k && l.value() == *v)
                })
            })
            .map(|m| {
                if m.get_counter().get_value() > 0.0 {
                    m.get_counter().get_value()
                } else {
                    m.get_histogram().get_sample_count() as f64
                }
            })
            .sum()
    }

    #[test]
    fn records_exceptions_and_requests_are_counted_with_bounded_labels() {
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
            ..Record::default()
        };
        deriver.observe(&error, "hybris");
        deriver.observe(&error, "hybris");
        let other_class = Record {
            stack_trace: "java.io.IOException: gone".to_owned(),
            ..error.clone()
        };
        deriver.observe(&other_class, "hybris");
        let mut access = Record {
            level: Some(Level::Info),
            ..Record::default()
        };
        for (k, v) in [("method", "GET"), ("status", "200"), ("duration", "250")] {
            access.fields.insert(k.to_owned(), v.to_owned());
        }
        deriver.observe(&access, "tomcat");
        deriver.observe(&access, "third-service");

        let v = |name, labels: &[(&str, &str)]| value(&registry, name, labels);
        assert_eq!(
            v(
                "log_records_total",
                &[("service", "hybris"), ("level", "ERROR")]
            ),
            3.0
        );
        assert_eq!(
            v(
                "log_exceptions_total",
                &[
                    ("service", "hybris"),
                    ("exception", "java.lang.IllegalStateException")
                ]
            ),
            2.0
        );
        assert_eq!(
            v(
                "log_exceptions_total",
                &[("service", "hybris"), ("exception", "other")]
            ),
            1.0
        );
        assert_eq!(
            v(
                "http_requests_total",
                &[("service", "tomcat"), ("status", "200")]
            ),
            1.0
        );
        assert_eq!(
            v(
                "http_requests_total",
                &[("service", "other"), ("status", "200")]
            ),
            1.0
        );
        assert_eq!(
            v("http_request_duration_seconds", &[("service", "tomcat")]),
            1.0
        );
        let sum: f64 = registry
            .gather()
            .iter()
            .filter(|f| f.name() == "http_request_duration_seconds")
            .flat_map(|f| f.get_metric().iter())
            .map(|m| m.get_histogram().get_sample_sum())
            .sum();
        assert!((sum - 0.5).abs() < 1e-9, "250 ms twice: {sum}");
    }
}
