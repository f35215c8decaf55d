//! A real Prometheus scrapes the four running services (OpenMetrics, exemplar storage on) and
//! loads the repository's rules (deploy/observability/prometheus/rules): every rule must
//! evaluate without error, and every metric name that a rule or a dashboard panel selects
//! must be one a service exports (or a rule records). Every dashboard expression is evaluated
//! too, with Grafana's variables substituted. A renamed metric or a broken panel fails here,
//! not on someone's screen.
//!
//! Needs the `prometheus` binary (Debian's package; scripts/observability.sh installs it) on
//! PATH, or at MALL_TEST_PROMETHEUS.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use mall_e2e::Platform;
use mall_test_support::shoe_change;
use promql_parser::{
    label::MatchOp,
    parser::Expr,
    util::{ExprVisitor, walk_expr},
};
use serde_json::Value;

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_evaluates_every_rule_and_dashboard_query_against_the_running_services() {
    let platform = Platform::start(None).await;
    // One change through Kinesis, so the source's per-shard series exist too.
    platform.put_change(&shoe_change("E2E-PROM-1", 1)).await;
    platform.wait_for_product("E2E-PROM-1", 1).await;

    let dir = tempfile::tempdir().expect("a temporary directory");
    let prometheus = Prometheus::start(dir.path(), &platform).await;

    // Every target is scraped.
    let targets = prometheus
        .wait_for("every service is scraped", |p| async move {
            let targets = p.get("/api/v1/targets").await?;
            let active = targets["data"]["activeTargets"].as_array()?.clone();
            (active.len() == 4 && active.iter().all(|t| t["health"] == "up")).then_some(active)
        })
        .await;
    assert_eq!(targets.len(), 4);

    // Every rule was evaluated, without error.
    let rules = prometheus
        .wait_for("every rule is evaluated", |p| async move {
            let rules = p.get("/api/v1/rules").await?;
            let all: Vec<Value> = rules["data"]["groups"]
                .as_array()?
                .iter()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            all.iter()
                .all(|r| {
                    !r["lastEvaluation"]
                        .as_str()
                        .unwrap_or("0001")
                        .starts_with("0001")
                })
                .then_some(all)
        })
        .await;
    let failing: Vec<String> = rules
        .iter()
        .filter(|r| r["health"] != "ok")
        .map(|r| format!("{}: {}", r["name"], r["lastError"]))
        .collect();
    assert!(failing.is_empty(), "rules that fail: {failing:#?}");

    // Names a query may select: what the services export, what the rules record, and
    // Prometheus' own.
    let exported: BTreeSet<String> = prometheus
        .get("/api/v1/label/__name__/values")
        .await
        .expect("names")["data"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    let recorded: BTreeSet<String> = rules
        .iter()
        .filter(|r| r["type"] == "recording")
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .collect();
    let builtin = BTreeSet::from(["up".to_owned(), "ALERTS".to_owned()]);

    let mut queries: Vec<(String, String)> = rules
        .iter()
        .map(|r| {
            (
                format!("rule {}", r["name"]),
                r["query"].as_str().expect("a query").to_owned(),
            )
        })
        .collect();
    let dashboards = dashboard_queries();
    assert!(
        dashboards.len() > 50,
        "the dashboards hold queries: {}",
        dashboards.len()
    );
    queries.extend(dashboards.iter().cloned());

    let mut unknown = Vec::new();
    for (whence, query) in &queries {
        let expr = promql_parser::parser::parse(query)
            .unwrap_or_else(|e| panic!("{whence} does not parse ({e}): {query}"));
        for name in metric_names(&expr) {
            // (A histogram's _bucket, _count and _sum are names of their own there.)
            let known =
                exported.contains(&name) || recorded.contains(&name) || builtin.contains(&name);
            if !known {
                unknown.push(format!("{whence}: {name}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "queries select metrics no service exports (renamed? not pre-initialised?): {unknown:#?}"
    );

    // Every dashboard expression evaluates.
    for (whence, query) in &dashboards {
        let answer = prometheus
            .query(query)
            .await
            .unwrap_or_else(|| panic!("{whence}: Prometheus does not answer"));
        assert_eq!(answer["status"], "success", "{whence}: {query}: {answer}");
    }
}

/// Every `expr` of every panel of the generated dashboards, with Grafana's interval variables
/// replaced by what Grafana would put there.
fn dashboard_queries() -> Vec<(String, String)> {
    let dir = repository().join("deploy/observability/grafana/dashboards");
    let mut queries = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("the dashboards folder") {
        let path = entry.expect("an entry").path();
        let board: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("readable"))
            .expect("a dashboard is JSON");
        for panel in board["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().cloned().unwrap_or_default() {
                if let Some(expr) = target["expr"].as_str() {
                    let expr = expr
                        .replace("$__rate_interval", "1m")
                        .replace("$__interval", "15s")
                        .replace("$__range", "1h");
                    assert!(
                        !expr.contains('$'),
                        "{}: an unknown variable in {expr}",
                        path.display()
                    );
                    queries.push((
                        format!(
                            "{} panel {:?}",
                            path.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
                            panel["title"]
                        ),
                        expr,
                    ));
                }
            }
        }
    }
    queries
}

/// The metric names `expr` selects, by name or by an exact `__name__` matcher.
fn metric_names(expr: &Expr) -> BTreeSet<String> {
    struct Names(BTreeSet<String>);
    impl ExprVisitor for Names {
        type Error = ();
        fn pre_visit(&mut self, expr: &Expr) -> Result<bool, ()> {
            let selector = match expr {
                Expr::VectorSelector(vs) => Some(vs),
                Expr::MatrixSelector(ms) => Some(&ms.vs),
                _ => None,
            };
            if let Some(vs) = selector {
                if let Some(name) = &vs.name {
                    self.0.insert(name.clone());
                }
                for m in &vs.matchers.matchers {
                    if m.name == "__name__" && matches!(m.op, MatchOp::Equal) {
                        self.0.insert(m.value.clone());
                    }
                }
            }
            Ok(true)
        }
    }
    let mut names = Names(BTreeSet::new());
    walk_expr(&mut names, expr).expect("the walk does not fail");
    names.0
}

/// A Prometheus process scraping the platform every second.
struct Prometheus {
    child: tokio::process::Child,
    addr: String,
    http: reqwest::Client,
}

impl Prometheus {
    async fn start(dir: &Path, platform: &Platform) -> Self {
        let binary = std::env::var("MALL_TEST_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
        let rules = repository().join("deploy/observability/prometheus/rules");
        let mut targets = String::new();
        for (service, addr) in platform.admin_addrs() {
            targets.push_str(&format!(
                "      - targets: [\"{addr}\"]\n        labels: {{service: {service}}}\n"
            ));
        }
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n  - {}\n\
             scrape_configs:\n  - job_name: mall\n    static_configs:\n{targets}",
            rules.join("mall.yml").display(),
            rules.join("slo.yml").display(),
        );
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).expect("config written");
        // A free port is only free until someone else takes it (tests run in parallel): a
        // Prometheus that exits at once is started again on another.
        for _ in 0..5 {
            let prometheus = Self::spawn(&binary, &config_file, dir);
            if let Some(prometheus) = prometheus.ready().await {
                return prometheus;
            }
        }
        panic!("Prometheus did not start on any of five ports");
    }

    fn spawn(binary: &str, config_file: &Path, dir: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let child = tokio::process::Command::new(binary)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--enable-feature=exemplar-storage")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {binary} ({e}): install Debian's prometheus package \
                     (scripts/observability.sh does), or set MALL_TEST_PROMETHEUS to its path"
                )
            });
        Self {
            child,
            addr,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("a client"),
        }
    }

    /// Itself once it answers `/-/ready`; `None` when the process exited first.
    async fn ready(mut self) -> Option<Self> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while tokio::time::Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return None;
            }
            let ready = self
                .http
                .get(format!("http://{}/-/ready", self.addr))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Some(self);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("Prometheus did not become ready within a minute");
    }

    async fn get(&self, path: &str) -> Option<Value> {
        json(self.http.get(format!("http://{}{path}", self.addr))).await
    }

    async fn query(&self, query: &str) -> Option<Value> {
        json(
            self.http
                .post(format!("http://{}/api/v1/query", self.addr))
                .form(&[("query", query)]),
        )
        .await
    }

    async fn wait_for<'a, T, F, Fut>(&'a self, what: &str, condition: F) -> T
    where
        F: Fn(&'a Self) -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        mall_test_support::wait_until(what, Duration::from_secs(60), || condition(self)).await
    }
}

/// The JSON answer to `request`, if it gets one.
async fn json(request: reqwest::RequestBuilder) -> Option<Value> {
    let body = request.send().await.ok()?.text().await.ok()?;
    serde_json::from_str(&body).ok()
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
