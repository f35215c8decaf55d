//! Prometheus metrics for every service, exposed in the OpenMetrics text format by the
//! official `prometheus-client` crate, so samples can carry exemplars (a trace id on the
//! sample a traced event incremented, which Grafana turns into a link to the trace).
//!
//! The types keep the small API the services were written against (`IntCounterVec::new(Opts,
//! labels)`, `with_label_values`, `registry.register(Box::new(metric))`), so a metric reads
//! the same in every service; underneath each is a `prometheus-client` metric or family.
//! Names are unchanged on the wire: a counter is declared with its `_total` name and
//! registered without it (OpenMetrics appends it), and label pairs are written in name
//! order, as before.

use std::{
    collections::HashSet,
    fmt::Write as _,
    sync::{Arc, Mutex, PoisonError},
};

use prometheus_client::{
    encoding::text,
    metrics::{
        counter::Counter,
        exemplar::{CounterWithExemplar, HistogramWithExemplars},
        family::{Family, MetricConstructor},
        gauge::Gauge as PcGauge,
        histogram::Histogram as PcHistogram,
    },
};

/// The content type of [`Registry::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A registration problem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two metrics with one name in a registry.
    #[error("metric {0} is registered already")]
    Duplicate(String),
    /// A name or label that cannot be exposed.
    #[error("{0}")]
    Invalid(String),
}

/// Registration's result.
pub type Result<T> = std::result::Result<T, Error>;

/// Labels of one series, in name order.
type Labels = Vec<(String, String)>;
/// Labels of an exemplar (`trace_id`).
type ExemplarLabels = Vec<(String, String)>;

/// A metric's name and help.
#[derive(Debug, Clone)]
struct Desc {
    name: String,
    help: String,
}

fn desc(name: &str, help: &str) -> Result<Desc> {
    let valid = name
        .bytes()
        .enumerate()
        .all(|(i, b)| b.is_ascii_alphabetic() || b == b'_' || (i > 0 && b.is_ascii_digit()));
    if name.is_empty() || !valid {
        return Err(Error::Invalid(format!("{name:?} is not a metric name")));
    }
    Ok(Desc {
        name: name.to_owned(),
        help: help.to_owned(),
    })
}

/// A metric's name and help, with the names of its labels (for a vector).
#[derive(Debug, Clone)]
pub struct Opts {
    name: String,
    help: String,
}

impl Opts {
    /// A metric named `name` (with `_total` for a counter) described by `help`.
    pub fn new(name: impl Into<String>, help: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            help: help.into(),
        }
    }
}

/// A histogram's name, help and bucket bounds.
#[derive(Debug, Clone)]
pub struct HistogramOpts {
    name: String,
    help: String,
    buckets: Vec<f64>,
}

impl HistogramOpts {
    /// A histogram with Prometheus' default buckets (5 ms to 10 s).
    pub fn new(name: impl Into<String>, help: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            help: help.into(),
            buckets: vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        }
    }

    /// Its bucket upper bounds, increasing.
    #[must_use]
    pub fn buckets(mut self, buckets: Vec<f64>) -> Self {
        self.buckets = buckets;
        self
    }
}

fn check_buckets(name: &str, buckets: &[f64]) -> Result<()> {
    if buckets.is_empty() || buckets.windows(2).any(|w| w[0] >= w[1] || w[0].is_nan()) {
        return Err(Error::Invalid(format!(
            "histogram {name}: buckets must be increasing and not empty"
        )));
    }
    Ok(())
}

/// Something a [`Registry`] exposes.
pub trait Collector: Send + Sync {
    /// Registers it in `registry` under its name.
    fn register_in(&self, registry: &mut prometheus_client::registry::Registry);
    /// Its name as exposed (without OpenMetrics' `_total`).
    fn name(&self) -> &str;
}

/// The metrics of one service, with a prefix (`mall_log_ingest`); cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Mutex<(prometheus_client::registry::Registry, HashSet<String>)>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// A registry without a prefix.
    pub fn new() -> Self {
        Self::with(prometheus_client::registry::Registry::default())
    }

    /// A registry whose names all start with `prefix_`.
    ///
    /// # Errors
    /// When `prefix` is not a metric name.
    pub fn with_prefix(prefix: &str) -> Result<Self> {
        desc(prefix, "")?;
        Ok(Self::with(
            prometheus_client::registry::Registry::with_prefix(prefix),
        ))
    }

    fn with(registry: prometheus_client::registry::Registry) -> Self {
        Self {
            inner: Arc::new(Mutex::new((registry, HashSet::new()))),
        }
    }

    /// Exposes `metric`.
    ///
    /// # Errors
    /// When a metric of that name is registered already.
    pub fn register(&self, metric: Box<dyn Collector>) -> Result<()> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if !inner.1.insert(metric.name().to_owned()) {
            return Err(Error::Duplicate(metric.name().to_owned()));
        }
        metric.register_in(&mut inner.0);
        Ok(())
    }

    /// Every metric in the OpenMetrics text format (ending with `# EOF`).
    pub fn encode(&self) -> String {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = String::with_capacity(16 * 1024);
        if let Err(error) = text::encode(&mut out, &inner.0) {
            // Writing to a String fails only on a bug in an encoder: say so in the output.
            let _ = writeln!(out, "# encoding failed: {error}");
        }
        out
    }
}

/// The exposed name of a counter declared as `name` (OpenMetrics adds `_total` itself).
fn counter_name(name: &str) -> &str {
    name.strip_suffix("_total").unwrap_or(name)
}

/// Label pairs for `values` of a vector with label `names`, in name order.
fn labels(names: &[String], values: &[&str]) -> Labels {
    assert_eq!(
        names.len(),
        values.len(),
        "{} label values for labels {names:?}",
        values.len()
    );
    let mut pairs: Labels = names
        .iter()
        .zip(values)
        .map(|(n, v)| (n.clone(), escape(v)))
        .collect();
    pairs.sort();
    pairs
}

/// A label value as the text format needs it: `prometheus-client` writes values as they
/// are, so a `"`, `\` or newline from a sender (an OTLP `service.name`) would otherwise end
/// the value early and break the whole scrape.
fn escape(value: &str) -> String {
    if !value.contains(['"', '\\', '\n']) {
        return value.to_owned();
    }
    let mut out = String::with_capacity(value.len() + 2);
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn label_names(names: &[&str]) -> Result<Vec<String>> {
    for name in names {
        desc(name, "")?;
    }
    Ok(names.iter().map(|n| (*n).to_owned()).collect())
}

/// A counter of whole events.
#[derive(Debug, Clone, Default)]
pub struct IntCounter {
    desc: Option<Arc<Desc>>,
    inner: Counter,
}

impl IntCounter {
    /// A counter named `name` (ending in `_total`).
    ///
    /// # Errors
    /// When the name cannot be exposed.
    pub fn new(name: impl Into<String>, help: impl Into<String>) -> Result<Self> {
        Ok(Self {
            desc: Some(Arc::new(desc(&name.into(), &help.into())?)),
            inner: Counter::default(),
        })
    }

    /// Adds one.
    pub fn inc(&self) {
        self.inner.inc();
    }

    /// Adds `v`.
    pub fn inc_by(&self, v: u64) {
        self.inner.inc_by(v);
    }

    /// Its value.
    pub fn get(&self) -> u64 {
        self.inner.get()
    }
}

impl Collector for IntCounter {
    fn register_in(&self, registry: &mut prometheus_client::registry::Registry) {
        if let Some(d) = &self.desc {
            registry.register(counter_name(&d.name), d.help.clone(), self.inner.clone());
        }
    }

    fn name(&self) -> &str {
        self.desc.as_ref().map_or("", |d| counter_name(&d.name))
    }
}

/// Counters by label values.
#[derive(Debug, Clone)]
pub struct IntCounterVec {
    desc: Arc<Desc>,
    names: Arc<[String]>,
    family: Family<Labels, Counter>,
}

impl IntCounterVec {
    /// Counters named by `opts` (ending in `_total`) with labels `names`.
    ///
    /// # Errors
    /// When a name cannot be exposed.
    pub fn new(opts: Opts, names: &[&str]) -> Result<Self> {
        Ok(Self {
            desc: Arc::new(desc(&opts.name, &opts.help)?),
            names: label_names(names)?.into(),
            family: Family::default(),
        })
    }

    /// The counter of these label values (in the order the labels were declared).
    ///
    /// # Panics
    /// When the number of values is not the number of labels (a bug).
    pub fn with_label_values(&self, values: &[&str]) -> IntCounter {
        IntCounter {
            desc: None,
            inner: self
                .family
                .get_or_create_owned(&labels(&self.names, values)),
        }
    }
}

impl Collector for IntCounterVec {
    fn register_in(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            counter_name(&self.desc.name),
            self.desc.help.clone(),
            self.family.clone(),
        );
    }

    fn name(&self) -> &str {
        counter_name(&self.desc.name)
    }
}

/// A gauge of whole numbers.
#[derive(Debug, Clone, Default)]
pub struct IntGauge {
    desc: Option<Arc<Desc>>,
    inner: PcGauge,
}

impl IntGauge {
    /// A gauge named `name`.
    ///
    /// # Errors
    /// When the name cannot be exposed.
    pub fn new(name: impl Into<String>, help: impl Into<String>) -> Result<Self> {
        Ok(Self {
            desc: Some(Arc::new(desc(&name.into(), &help.into())?)),
            inner: PcGauge::default(),
        })
    }

    /// Sets it.
    pub fn set(&self, v: i64) {
        self.inner.set(v);
    }

    /// Adds one.
    pub fn inc(&self) {
        self.inner.inc();
    }

    /// Subtracts one.
    pub fn dec(&self) {
        self.inner.dec();
    }

    /// Adds `v`.
    pub fn add(&self, v: i64) {
        self.inner.inc_by(v);
    }

    /// Subtracts `v`.
    pub fn sub(&self, v: i64) {
        self.inner.dec_by(v);
    }

    /// Its value.
    pub fn get(&self) -> i64 {
        self.inner.get()
    }
}

impl Collector for IntGauge {
    fn register_in(&self, registry: &mut prometheus_client::registry::Registry) {
        if let Some(d) = &self.desc {
            registry.register(d.name.clone(), d.help.clone(), self.inner.clone());
        }
    }

    fn name(&self) -> &str {
        self.desc.as_ref().map_or("", |d| d.name.as_str())
    }
}

/// Gauges of whole numbers by label values.
#[derive(Debug, Clone)]
pub struct IntGaugeVec {
    desc: Arc<Desc>,
    names: Arc<[String]>,
    family: Family<Labels, PcGauge>,
}

impl IntGaugeVec {
    /// Gauges named by `opts` with labels `names`.
    ///
    /// # Errors
    /// When a name cannot be exposed.
    pub fn new(opts: Opts, names: &[&str]) -> Result<Self> {
        Ok(Self {
            desc: Arc::new(desc(&opts.name, &opts.help)?),
            names: label_names(names)?.into(),
            family: Family::default(),
        })
    }

    /// The gauge of these label values.
    ///
    /// # Panics
    /// When the number of values is not the number of labels (a bug).
    pub fn with_label_values(&self, values: &[&str]) -> IntGauge {
        IntGauge {
            desc: None,
            inner: self
                .family
                .get_or_create_owned(&labels(&self.names, values)),
        }
    }

    /// Stops exposing the series of these label values (a shard that went away).
    ///
    /// # Errors
    /// When there was no such series.
    pub fn remove_label_values(&self, values: &[&str]) -> Result<()> {
        if self.family.remove(&labels(&self.names, values)) {
            Ok(())
        } else {
            Err(Error::Invalid(format!("no series {values:?}")))
        }
    }
}

impl Collector for IntGaugeVec {
    fn register_in(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            self.desc.name.clone(),
            self.desc.help.clone(),
            self.family.clone(),
        );
    }

    fn name(&self) -> &str {
        &self.desc.name
    }
}

/// A gauge of real numbers.
#[derive(Debug, Clone, Default)]
pub struct Gauge {
    desc: Option<Arc<Desc>>,
    inner: PcGauge<f64, std::sync::atomic::AtomicU64>,
}

impl Gauge {
    /// A gauge named `name`.
    ///
    /// # Errors
    /// When the name cannot be exposed.
    pub fn new(name: impl Into<String>, help: impl Into<String>) -> Result<Self> {
        Ok(Self {
            desc: Some(Arc::new(desc(&name.into(), &help.into())?)),
            inner: PcGauge::default(),
        })
    }

    /// Sets it.
    pub fn set(&self, v: f64) {
        self.inner.set(v);
    }

    /// Its value.
    pub fn get(&self) -> f64 {
        self.inner.get()
    }
}

impl Collector for Gauge {
    fn register_in(&self, registry: &mut prometheus_client::registry::Registry) {
        if let Some(d) = &self.desc {
            registry.register(d.name.clone(), d.help.clone(), self.inner.clone());
        }
    }

    fn name(&self) -> &str {
        self.desc.as_ref().map_or("", |d| d.name.as_str())
    }
}

/// Makes a family's histograms with the family's buckets.
#[derive(Debug, Clone)]
struct Buckets(Arc<[f64]>);

impl MetricConstructor<PcHistogram> for Buckets {
    fn new_metric(&self) -> PcHistogram {
        PcHistogram::new(self.0.iter().copied())
    }
}

impl MetricConstructor<HistogramWithExemplars<ExemplarLabels>> for Buckets {
    fn new_metric(&self) -> HistogramWithExemplars<ExemplarLabels> {
        HistogramWithExemplars::new(self.0.iter().copied())
    }
}

/// A distribution of observed values.
#[derive(Debug, Clone)]
pub struct Histogram {
    desc: Option<Arc<Desc>>,
    inner: PcHistogram,
}

impl Histogram {
    /// A histogram as `opts` say.
    ///
    /// # Errors
    /// When the name cannot be exposed or the buckets are not increasing.
    pub fn with_opts(opts: HistogramOpts) -> Result<Self> {
        check_buckets(&opts.name, &opts.buckets)?;
        Ok(Self {
            desc: Some(Arc::new(desc(&opts.name, &opts.help)?)),
            inner: PcHistogram::new(opts.buckets.iter().copied()),
        })
    }

    /// Observes `v`.
    pub fn observe(&self, v: f64) {
        self.inner.observe(v);
    }
}

impl Collector for Histogram {
    fn register_in(&self, registry: &mut prometheus_client::registry::Registry) {
        if let Some(d) = &self.desc {
            registry.register(d.name.clone(), d.help.clone(), self.inner.clone());
        }
    }

    fn name(&self) -> &str {
        self.desc.as_ref().map_or("", |d| d.name.as_str())
    }
}

/// Histograms by label values.
#[derive(Debug, Clone)]
pub struct HistogramVec {
    desc: Arc<Desc>,
    names: Arc<[String]>,
    family: Family<Labels, PcHistogram, Buckets>,
}

impl HistogramVec {
    /// Histograms as `opts` say, with labels `names`.
    ///
    /// # Errors
    /// When a name cannot be exposed or the buckets are not increasing.
    pub fn new(opts: HistogramOpts, names: &[&str]) -> Result<Self> {
        check_buckets(&opts.name, &opts.buckets)?;
        Ok(Self {
            desc: Arc::new(desc(&opts.name, &opts.help)?),
            names: label_names(names)?.into(),
            family: Family::new_with_constructor(Buckets(opts.buckets.into())),
        })
    }

    /// The histogram of these label values.
    ///
    /// # Panics
    /// When the number of values is not the number of labels (a bug).
    pub fn with_label_values(&self, values: &[&str]) -> Histogram {
        Histogram {
            desc: None,
            inner: self
                .family
                .get_or_create_owned(&labels(&self.names, values)),
        }
    }
}

impl Collector for HistogramVec {
    fn register_in(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            self.desc.name.clone(),
            self.desc.help.clone(),
            self.family.clone(),
        );
    }

    fn name(&self) -> &str {
        &self.desc.name
    }
}

/// The exemplar of a trace: `trace_id="…"`, or none without one.
fn exemplar(trace_id: &str) -> Option<ExemplarLabels> {
    (!trace_id.is_empty()).then(|| vec![("trace_id".to_owned(), escape(trace_id))])
}

/// A counter whose series keep the trace id of their latest traced increment.
#[derive(Debug, Clone)]
pub struct ExemplarCounter {
    inner: CounterWithExemplar<ExemplarLabels>,
}

impl ExemplarCounter {
    /// Adds one; `trace_id` (32 hex digits) becomes the series' exemplar. Without one the
    /// exemplar of the latest traced increment stays (`inc_by` would clear it).
    pub fn inc(&self, trace_id: &str) {
        match exemplar(trace_id) {
            Some(labels) => {
                self.inner.inc_by(1, Some(labels), None);
            }
            None => {
                self.inner
                    .inner()
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Its value.
    pub fn get(&self) -> u64 {
        self.inner.get().0
    }
}

/// Counters with exemplars by label values.
#[derive(Debug, Clone)]
pub struct ExemplarCounterVec {
    desc: Arc<Desc>,
    names: Arc<[String]>,
    family: Family<Labels, CounterWithExemplar<ExemplarLabels>>,
}

impl ExemplarCounterVec {
    /// Counters named by `opts` (ending in `_total`) with labels `names`.
    ///
    /// # Errors
    /// When a name cannot be exposed.
    pub fn new(opts: Opts, names: &[&str]) -> Result<Self> {
        Ok(Self {
            desc: Arc::new(desc(&opts.name, &opts.help)?),
            names: label_names(names)?.into(),
            family: Family::default(),
        })
    }

    /// The counter of these label values.
    ///
    /// # Panics
    /// When the number of values is not the number of labels (a bug).
    pub fn with_label_values(&self, values: &[&str]) -> ExemplarCounter {
        ExemplarCounter {
            inner: self
                .family
                .get_or_create_owned(&labels(&self.names, values)),
        }
    }
}

impl Collector for ExemplarCounterVec {
    fn register_in(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            counter_name(&self.desc.name),
            self.desc.help.clone(),
            self.family.clone(),
        );
    }

    fn name(&self) -> &str {
        counter_name(&self.desc.name)
    }
}

/// A histogram whose buckets keep the trace id of their latest traced observation.
#[derive(Debug, Clone)]
pub struct ExemplarHistogram {
    inner: HistogramWithExemplars<ExemplarLabels>,
}

impl ExemplarHistogram {
    /// Observes `v`; `trace_id` (or empty) becomes its bucket's exemplar.
    pub fn observe(&self, v: f64, trace_id: &str) {
        self.inner.observe(v, exemplar(trace_id), None);
    }
}

/// Histograms with exemplars by label values.
#[derive(Debug, Clone)]
pub struct ExemplarHistogramVec {
    desc: Arc<Desc>,
    names: Arc<[String]>,
    family: Family<Labels, HistogramWithExemplars<ExemplarLabels>, Buckets>,
}

impl ExemplarHistogramVec {
    /// Histograms as `opts` say, with labels `names`.
    ///
    /// # Errors
    /// When a name cannot be exposed or the buckets are not increasing.
    pub fn new(opts: HistogramOpts, names: &[&str]) -> Result<Self> {
        check_buckets(&opts.name, &opts.buckets)?;
        Ok(Self {
            desc: Arc::new(desc(&opts.name, &opts.help)?),
            names: label_names(names)?.into(),
            family: Family::new_with_constructor(Buckets(opts.buckets.into())),
        })
    }

    /// The histogram of these label values.
    ///
    /// # Panics
    /// When the number of values is not the number of labels (a bug).
    pub fn with_label_values(&self, values: &[&str]) -> ExemplarHistogram {
        ExemplarHistogram {
            inner: self
                .family
                .get_or_create_owned(&labels(&self.names, values)),
        }
    }
}

impl Collector for ExemplarHistogramVec {
    fn register_in(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            self.desc.name.clone(),
            self.desc.help.clone(),
            self.family.clone(),
        );
    }

    fn name(&self) -> &str {
        &self.desc.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_as_declared_labels_in_name_order_and_exemplars_are_exposed() {
        let registry = Registry::with_prefix("mall_test").expect("a prefix");
        let requests =
            IntCounterVec::new(Opts::new("requests_total", "Requests"), &["method", "code"])
                .expect("a vector");
        let waiting = IntGauge::new("waiting", "Waiting").expect("a gauge");
        let latency = HistogramVec::new(
            HistogramOpts::new("latency_seconds", "Latency").buckets(vec![0.1, 1.0]),
            &["method"],
        )
        .expect("a vector");
        let errors = ExemplarCounterVec::new(Opts::new("errors_total", "Errors"), &["service"])
            .expect("a vector");
        registry.register(Box::new(requests.clone())).expect("new");
        registry.register(Box::new(waiting.clone())).expect("new");
        registry.register(Box::new(latency.clone())).expect("new");
        registry.register(Box::new(errors.clone())).expect("new");
        assert!(matches!(
            registry.register(Box::new(waiting.clone())),
            Err(Error::Duplicate(_))
        ));
        requests.with_label_values(&["Get", "OK"]).inc_by(2);
        waiting.set(-3);
        latency.with_label_values(&["Get"]).observe(0.5);
        errors
            .with_label_values(&["shop"])
            .inc("4bf92f3577b34da6a3ce929d0e0e4736");
        // An untraced increment keeps the traced one's exemplar.
        errors.with_label_values(&["shop"]).inc("");
        // A value a sender chose cannot break the format.
        requests
            .with_label_values(&["Get", "bad\"} 1\nfake 9"])
            .inc();
        let text = registry.encode();
        for line in [
            "# TYPE mall_test_requests counter",
            r#"mall_test_requests_total{code="OK",method="Get"} 2"#,
            "mall_test_waiting -3",
            r#"mall_test_latency_seconds_bucket{le="1.0",method="Get"} 1"#,
            r#"mall_test_latency_seconds_count{method="Get"} 1"#,
            r#"mall_test_errors_total{service="shop"} 2 # {trace_id="4bf92f3577b34da6a3ce929d0e0e4736"} 1.0"#,
            r#"mall_test_requests_total{code="bad\"} 1\nfake 9",method="Get"} 1"#,
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} in\n{text}");
        }
        assert_eq!(requests.with_label_values(&["Get", "OK"]).get(), 2);
        assert!(!text.lines().any(|l| l.starts_with("fake")), "{text}");
        assert!(IntGauge::new("bad name", "x").is_err());
        assert!(
            HistogramOpts::new("h", "x")
                .buckets(vec![1.0, 0.5])
                .buckets
                .len()
                == 2
        );
        assert!(
            Histogram::with_opts(HistogramOpts::new("h", "x").buckets(vec![1.0, 0.5])).is_err()
        );
    }
}
