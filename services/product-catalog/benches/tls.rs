//! `scripts/bench.sh tls`: what mutual TLS costs a reader, and what a hostile client costs a
//! normal one. Writes the `mutual-tls` section of BENCHMARKS.md.
//!
//! Two catalogs in this process on SQLite files with the same 20,000 products, read cache warm:
//! one plaintext, one with mutual TLS (certificates from a local CA). Each round measures
//! GetProduct on both, one HTTP/2 connection per server reused by every caller (as real
//! callers do), at 1 and 8 callers for a few seconds each; the ratio is TLS over plaintext in
//! the same round. Then the attack of the hostile-client test, at benchmark scale: 200
//! connections that never handshake, 10 that trickle HTTP/2 a byte at a time, and one caller
//! flooding with 32 calls at a time, while a normal caller makes calls one after another; its
//! p50 and p99 next to the same caller's without the attack.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use mall_grpc::tls::{ClientTls, ServerTls};
use mall_proto::catalog::v1::{
    BulkUpdateProductsRequest, GetProductRequest, ProductUpdate,
    product_catalog_service_client::ProductCatalogServiceClient,
};
use mall_test_support::{
    TestDatabase, bench,
    certs::{Authority, CertFiles, Validity},
};
use product_catalog::{App, Settings};
use tokio::io::AsyncWriteExt as _;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const PRODUCTS: usize = 20_000;
const WINDOW: Duration = Duration::from_secs(4);
const ROUNDS: usize = 3;

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

struct Server {
    url: String,
    _database: TestDatabase,
}

async fn start(tls: Option<ServerTls>, shutdown: &CancellationToken) -> anyhow::Result<Server> {
    let database = TestDatabase::sqlite();
    let mut settings = Settings::default();
    settings.server.listen_addr = "127.0.0.1:0".parse()?;
    settings.server.admin_addr = "127.0.0.1:0".parse()?;
    settings.database.url = database.url().to_owned().into();
    settings.catalog.read_cache_entries = 2 * PRODUCTS;
    let scheme = if tls.is_some() { "https" } else { "http" };
    settings.server.tls = tls;
    let app = App::build(settings).await?;
    let url = format!("{scheme}://localhost:{}", app.grpc_addr().port());
    tokio::spawn(app.run_until(shutdown.clone().cancelled_owned()));
    Ok(Server {
        url,
        _database: database,
    })
}

async fn client(
    url: &str,
    tls: Option<&ClientTls>,
) -> anyhow::Result<ProductCatalogServiceClient<Channel>> {
    let channel = mall_grpc::client::connect(url, tls, Duration::from_secs(5)).await?;
    Ok(ProductCatalogServiceClient::new(channel))
}

/// Loads the products (as the relay, over its channel) and warms the read cache.
async fn load(client: &mut ProductCatalogServiceClient<Channel>) -> anyhow::Result<()> {
    for start in (0..PRODUCTS).step_by(1_000) {
        let updates = (start..start + 1_000)
            .map(|i| ProductUpdate {
                product: Some(bench::product(i, 1)),
                update_mask: None,
            })
            .collect();
        client
            .bulk_update_products(BulkUpdateProductsRequest {
                product_type: "apparel".into(),
                updates,
                ..Default::default()
            })
            .await?;
    }
    for i in 0..PRODUCTS {
        client
            .get_product(GetProductRequest {
                code: bench::code(i),
            })
            .await?;
    }
    Ok(())
}

struct Reads {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

/// GetProduct from `callers` tasks sharing `client`'s connection for [`WINDOW`].
async fn reads(client: &ProductCatalogServiceClient<Channel>, callers: usize) -> Reads {
    let end = Instant::now() + WINDOW;
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < end {
                    let code = bench::code(fastrand::usize(..PRODUCTS));
                    let start = Instant::now();
                    client
                        .get_product(GetProductRequest { code })
                        .await
                        .expect("a read succeeds");
                    latencies.push(start.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("joins"));
    }
    summarize(latencies, WINDOW)
}

fn summarize(mut latencies: Vec<Duration>, elapsed: Duration) -> Reads {
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Reads {
        rate: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
    }
}

/// The normal caller: `calls` GetProducts one after another on its own connection.
async fn normal_caller(url: &str, tls: &ClientTls, calls: usize) -> anyhow::Result<Reads> {
    let mut caller = client(url, Some(tls)).await?;
    let mut latencies = Vec::with_capacity(calls);
    let started = Instant::now();
    for _ in 0..calls {
        let code = bench::code(fastrand::usize(..PRODUCTS));
        let start = Instant::now();
        caller.get_product(GetProductRequest { code }).await?;
        latencies.push(start.elapsed());
    }
    Ok(summarize(latencies, started.elapsed()))
}

/// Starts the attack on the TLS server; it runs until `stop`.
async fn attack(
    url: &str,
    ca: &Authority,
    flooder: &CertFiles,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let port: u16 = url.rsplit(':').next().unwrap_or_default().parse()?;
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let stop = stop.clone();
        // Holds the socket open, saying nothing, until the end (the server closes it at its
        // handshake deadline; a new one is not opened).
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            drop(tcp);
        }));
    }
    let tls = ClientTls::new(
        ca.ca_file(),
        Some((flooder.cert.clone(), flooder.key.clone())),
    );
    for _ in 0..10 {
        let stop = stop.clone();
        let config = mall_grpc::tls::client_config(&tls)?.current();
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let mut conn = tokio_rustls::TlsConnector::from(config)
            .connect(rustls::pki_types::ServerName::try_from("localhost")?, tcp)
            .await?;
        tasks.push(tokio::spawn(async move {
            for byte in b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".iter().cycle() {
                if stop.load(Ordering::Relaxed) || conn.write_all(&[*byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    let flood = client(url, Some(&tls)).await?;
    for _ in 0..32 {
        let (mut flood, stop) = (flood.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let code = bench::code(fastrand::usize(..PRODUCTS));
                // Refusals (its own concurrency limit) are expected; it just keeps going.
                let _ = flood.get_product(GetProductRequest { code }).await;
            }
        }));
    }
    Ok(tasks)
}

async fn run() -> anyhow::Result<()> {
    mall_grpc::tls::install_crypto_provider();
    let dir = tempfile::tempdir()?;
    let ca = Authority::new(dir.path(), "bench")?;
    let issue = |name: &str, id: &str| ca.issue(name, Some(id), &[], Validity::Current);
    let server_cert = issue(
        "product-catalog",
        &Authority::spiffe_id("mall-platform", "product-catalog"),
    )?;
    let relay = issue("sync-relay", mall_grpc::authz::identities::SYNC_RELAY)?;
    let reader = issue("reader", &Authority::spiffe_id("shop", "storefront"))?;
    let flooder = issue("flooder", &Authority::spiffe_id("shop", "flooder"))?;
    let shutdown = CancellationToken::new();
    let plain = start(None, &shutdown).await?;
    let secure = start(
        Some(ServerTls {
            cert_file: server_cert.cert.clone(),
            key_file: server_cert.key.clone(),
            client_ca_file: ca.ca_file().to_owned(),
            reload_interval: Duration::from_secs(10),
        }),
        &shutdown,
    )
    .await?;
    let tls_of =
        |who: &CertFiles| ClientTls::new(ca.ca_file(), Some((who.cert.clone(), who.key.clone())));
    load(&mut client(&plain.url, None).await?).await?;
    load(&mut client(&secure.url, Some(&tls_of(&relay))).await?).await?;

    let plain_client = client(&plain.url, None).await?;
    let tls_client = client(&secure.url, Some(&tls_of(&reader))).await?;
    let mut rows = Vec::new();
    for round in 1..=ROUNDS {
        for callers in [1, 8] {
            let without = reads(&plain_client, callers).await;
            let with = reads(&tls_client, callers).await;
            let ratio = with.rate / without.rate;
            eprintln!(
                "round {round}, {callers} callers: plaintext {:.0}/s, mutual TLS {:.0}/s, ratio {ratio:.2}",
                without.rate, with.rate
            );
            rows.push((callers, without, with, ratio));
        }
    }

    let calls = 2_000;
    let quiet = normal_caller(&secure.url, &tls_of(&reader), calls).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = attack(&secure.url, &ca, &flooder, &stop).await?;
    // Let the attack take hold.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let attacked = normal_caller(&secure.url, &tls_of(&reader), calls).await?;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    eprintln!(
        "normal caller: quiet p50 {:?} p99 {:?}; under attack p50 {:?} p99 {:?}",
        quiet.p50, quiet.p99, attacked.p50, attacked.p99
    );
    shutdown.cancel();
    write_report(&rows, &quiet, &attacked, calls)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn write_report(
    rows: &[(usize, Reads, Reads, f64)],
    quiet: &Reads,
    attacked: &Reads,
    calls: usize,
) -> anyhow::Result<()> {
    let median = |callers: usize| {
        let mut ratios: Vec<f64> = rows
            .iter()
            .filter(|r| r.0 == callers)
            .map(|r| r.3)
            .collect();
        ratios.sort_by(f64::total_cmp);
        ratios[ratios.len() / 2]
    };
    let mut s = String::new();
    s.push_str("## mutual TLS\n\n");
    s.push_str(&format!(
        "{} Load average before: {}.\n\n",
        bench::machine(),
        bench::load_average()
    ));
    s.push_str(
        "Command: `scripts/bench.sh tls` (`services/product-catalog/benches/tls.rs`, release). Two \
         catalogs in one process on SQLite with the same 20,000 products, read cache warm: one \
         plaintext, one with mutual TLS (rustls, ring, TLS 1.3, ECDSA P-256 certificates from a \
         local CA). GetProduct of random codes; every caller of a server shares one HTTP/2 \
         connection, reused as real callers do; 4 s per measurement, rounds alternate the two \
         servers. Ratio = mutual TLS over plaintext in the same round (target ≥ 0.8).\n\n",
    );
    s.push_str(
        "| round | callers | plaintext /s | p50 | p99 | mutual TLS /s | p50 | p99 | ratio |\n",
    );
    s.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for (i, (callers, without, with, ratio)) in rows.iter().enumerate() {
        s.push_str(&format!(
            "| {} | {callers} | {:.0} | {} | {} | {:.0} | {} | {} | {ratio:.2} |\n",
            i / 2 + 1,
            without.rate,
            ms(without.p50),
            ms(without.p99),
            with.rate,
            ms(with.p50),
            ms(with.p99),
        ));
    }
    s.push_str(&format!(
        "\nMedian ratio: **{:.2}** at 1 caller, **{:.2}** at 8 callers.\n\n",
        median(1),
        median(8)
    ));
    s.push_str(&format!(
        "Under attack (the hostile-client test's attack: 200 connections that never start the \
         handshake, 10 that trickle HTTP/2 a byte every 100 ms, one caller flooding with 32 calls \
         at a time, under the default `per_caller_concurrency` of 256, so load rather than \
         refusals), a normal caller's {calls} GetProducts one after another on a connection of its own, next to the same caller \
         without the attack (target p99 < 50 ms):\n\n"
    ));
    s.push_str("| | calls/s | p50 | p99 |\n|---|---|---|---|\n");
    s.push_str(&format!(
        "| quiet | {:.0} | {} | {} |\n| under attack | {:.0} | {} | {} |\n\n",
        quiet.rate,
        ms(quiet.p50),
        ms(quiet.p99),
        attacked.rate,
        ms(attacked.p50),
        ms(attacked.p99)
    ));
    bench::replace_section("mutual-tls", &s)
}
