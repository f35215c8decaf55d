//! Benchmark of the catalog on PostgreSQL, each figure next to a baseline measured in the
//! same run, so the ratio means something on a noisy machine:
//!
//! 1. BulkUpdateProducts with 1,000-item requests (rows/s), next to the same rows upserted by
//!    one hand-written multi-row `INSERT ... ON CONFLICT DO UPDATE` statement through the
//!    same driver (sqlx via sea-orm) into a table of the same shape;
//! 2. GetProduct requests/s and p50/p99 latency at several concurrency levels, next to the
//!    trivial RPC of the same server (grpc.health.v1 Check);
//! 3. the same at 32 callers while BulkUpdateProducts writes 5,000 partial changes/s to
//!    random products (the relay's steady load), so the read cache's invalidation shows.
//!
//! Run with `scripts/bench.sh catalog` (it provides PostgreSQL); the results replace the
//! product-catalog section of BENCHMARKS.md.

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use futures::{StreamExt as _, TryStreamExt as _};
use mall_proto::catalog::v1::{
    BulkUpdateProductsRequest, GetProductRequest, Product, ProductUpdate,
    product_catalog_service_client::ProductCatalogServiceClient,
};
use mall_test_support::{TestDatabase, bench, probe, wait_until};
use product_catalog::{App, Settings};
use sea_orm::{ConnectionTrait as _, Database, DatabaseConnection, Statement, Value as SqlValue};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Products in the catalog while measuring.
const PRODUCTS: usize = 20_000;
/// Items per BulkUpdateProducts request (the contract's maximum).
const BATCH: usize = 1_000;
/// Rounds of bulk writes (each round rewrites every product with a newer version).
const ROUNDS: u64 = 5;
/// Requests in flight at once in the bulk comparison, for both paths: one after another, and
/// as many as the machine has cores (how the relay and the importer call it).
const IN_FLIGHT: [usize; 2] = [1, 2];
/// How long each read measurement runs.
const READ_WINDOW: Duration = Duration::from_secs(4);
/// Concurrent callers for the read measurements.
const CONCURRENCY: [usize; 4] = [1, 8, 32, 128];
/// Changes per second written during the read-under-write measurement, and per request.
const WRITE_LOAD: usize = 5_000;
const WRITE_BATCH: usize = 100;
/// Callers of the read-under-write measurement.
const UNDER_WRITE_CONCURRENCY: usize = 32;

/// The allocator the service binary uses, so the benchmark measures what runs in production.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let database = TestDatabase::postgres().await;
    let mut settings = Settings::default();
    settings.server.listen_addr = "127.0.0.1:0".parse()?;
    settings.server.admin_addr = "127.0.0.1:0".parse()?;
    settings.database.url = database.url().to_owned().into();
    settings.database.max_connections = 16;
    settings.telemetry.log_filter = "warn".into();
    // Room for every product: the benchmark measures a warm cache, not its eviction.
    settings.catalog.read_cache_entries = 2 * PRODUCTS;
    // A second replica on the same database without the read cache, to show the database
    // read path next to the cached one.
    let mut uncached_settings = settings.clone();
    uncached_settings.catalog.read_cache_entries = 0;
    let app = App::build(settings).await?;
    let addr = app.grpc_addr();
    let uncached_app = App::build(uncached_settings).await?;
    let uncached_addr = uncached_app.grpc_addr();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(app.run_until(shutdown.clone().cancelled_owned()));
    let uncached_server = tokio::spawn(uncached_app.run_until(shutdown.clone().cancelled_owned()));
    for addr in [addr, uncached_addr] {
        wait_until("the catalog serves", Duration::from_secs(30), || async {
            probe::health(addr, "").await.map(|_| ())
        })
        .await;
    }

    let baseline = Database::connect(database.url()).await?;
    baseline
        .execute_unprepared("CREATE TABLE baseline_products (LIKE products INCLUDING ALL)")
        .await?;

    let channel = probe::channel(addr);
    let catalog = ProductCatalogServiceClient::new(channel.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let uncached = ProductCatalogServiceClient::new(probe::channel(uncached_addr));

    eprintln!("bulk: {ROUNDS} rounds of {PRODUCTS} products in requests of {BATCH}");
    let mut bulk_rounds = Vec::new();
    let mut version = 0;
    for in_flight in IN_FLIGHT {
        let mut rounds = Vec::new();
        for round in 1..=ROUNDS {
            version += 1;
            let products: Vec<Product> =
                (0..PRODUCTS).map(|i| bench::product(i, version)).collect();
            // Alternate which goes first, so neither always meets a warmer cache.
            let (bulk, sql) = if round % 2 == 0 {
                let sql = hand_written(&baseline, &products, in_flight).await?;
                (bulk_update(&catalog, &products, in_flight).await?, sql)
            } else {
                let bulk = bulk_update(&catalog, &products, in_flight).await?;
                (bulk, hand_written(&baseline, &products, in_flight).await?)
            };
            eprintln!(
                "  {in_flight} in flight, round {round}: BulkUpdateProducts {bulk:.0} rows/s, \
                 hand-written upsert {sql:.0} rows/s"
            );
            rounds.push((bulk, sql));
        }
        bulk_rounds.push((in_flight, rounds));
    }

    // Warm the read cache (BatchGetProducts fills it too), as a running catalog would be.
    let codes: Vec<String> = (0..PRODUCTS).map(bench::code).collect();
    for chunk in codes.chunks(BATCH) {
        catalog
            .clone()
            .batch_get_products(mall_proto::catalog::v1::BatchGetProductsRequest {
                codes: chunk.to_vec(),
            })
            .await?;
    }

    let mut reads = Vec::new();
    for concurrency in CONCURRENCY {
        let get = get_products(concurrency, &catalog).await;
        let from_database = get_products(concurrency, &uncached).await;
        let health = health_checks(concurrency, &channel).await;
        eprintln!(
            "  concurrency {concurrency}: GetProduct {:.0}/s p50 {:?} p99 {:?}; uncached {:.0}/s p50 {:?} p99 {:?}; Check {:.0}/s p50 {:?} p99 {:?}",
            get.rate,
            get.p50,
            get.p99,
            from_database.rate,
            from_database.p50,
            from_database.p99,
            health.rate,
            health.p50,
            health.p99
        );
        reads.push((concurrency, get, from_database, health));
    }

    eprintln!("reads while {WRITE_LOAD} changes/s are written");
    let stop_writing = CancellationToken::new();
    let writer = tokio::spawn(write_load(
        catalog.clone(),
        version + 1,
        stop_writing.clone(),
    ));
    let get = get_products(UNDER_WRITE_CONCURRENCY, &catalog).await;
    let health = health_checks(UNDER_WRITE_CONCURRENCY, &channel).await;
    stop_writing.cancel();
    let written = writer.await??;
    eprintln!(
        "  GetProduct {:.0}/s p99 {:?}; Check {:.0}/s p99 {:?}; {written:.0} changes/s written",
        get.rate, get.p99, health.rate, health.p99
    );
    let under_write = (get, health, written);

    shutdown.cancel();
    server.await??;
    uncached_server.await??;
    write_report(&bulk_rounds, &reads, under_write)
}

/// Writes [`WRITE_LOAD`] partial changes (prices) per second to random products, in requests
/// of [`WRITE_BATCH`] (up to 8 in flight, as the relay's consumers send them), from
/// `first_version` up, until `stop`; the rate achieved.
async fn write_load(
    client: ProductCatalogServiceClient<Channel>,
    first_version: u64,
    stop: CancellationToken,
) -> anyhow::Result<f64> {
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
    let mut requests = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(
        WRITE_BATCH as f64 / WRITE_LOAD as f64,
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let start = Instant::now();
    let mut written = 0usize;
    let mut version = first_version;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        version += 1;
        let mut codes: Vec<usize> = (0..WRITE_BATCH)
            .map(|_| fastrand::usize(..PRODUCTS))
            .collect();
        codes.sort_unstable();
        codes.dedup();
        let updates = codes
            .iter()
            .map(|&i| ProductUpdate {
                product: Some(bench::product(i, version)),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["prices".into()],
                }),
            })
            .collect::<Vec<_>>();
        written += updates.len();
        let permit = in_flight.clone().acquire_owned().await?;
        let mut client = client.clone();
        requests.spawn(async move {
            let _permit = permit;
            client
                .bulk_update_products(BulkUpdateProductsRequest {
                    request_id: String::new(),
                    product_type: "apparel".into(),
                    updates,
                })
                .await
                .map(drop)
        });
        while let Some(done) = requests.try_join_next() {
            done??;
        }
    }
    let elapsed = start.elapsed();
    while let Some(done) = requests.join_next().await {
        done??;
    }
    Ok(written as f64 / elapsed.as_secs_f64())
}

/// Health Check from `concurrency` tasks, through [`measure`].
async fn health_checks(concurrency: usize, channel: &Channel) -> Reads {
    let channel = channel.clone();
    measure(concurrency, move || {
        let mut client = HealthClient::new(channel.clone());
        async move {
            client
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|_| ())
        }
    })
    .await
}

/// Sends every product in requests of [`BATCH`], one at a time; rows/s.
async fn bulk_update(
    client: &ProductCatalogServiceClient<Channel>,
    products: &[Product],
    in_flight: usize,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let requests = products.chunks(BATCH).map(|chunk| {
        let mut client = client.clone();
        let request = BulkUpdateProductsRequest {
            request_id: String::new(),
            product_type: "apparel".into(),
            updates: chunk
                .iter()
                .map(|p| ProductUpdate {
                    product: Some(p.clone()),
                    update_mask: None,
                })
                .collect(),
        };
        async move { client.bulk_update_products(request).await.map(drop) }
    });
    futures::stream::iter(requests)
        .buffer_unordered(in_flight)
        .try_collect::<()>()
        .await?;
    Ok(products.len() as f64 / start.elapsed().as_secs_f64())
}

/// Upserts the same rows with one hand-written statement per [`BATCH`]; rows/s. The rows are
/// encoded exactly as the catalog stores them (JSON text columns), and encoding is timed too.
async fn hand_written(
    db: &DatabaseConnection,
    products: &[Product],
    in_flight: usize,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    futures::stream::iter(products.chunks(BATCH).map(Ok))
        .try_for_each_concurrent(in_flight, |chunk| upsert(db, chunk))
        .await?;
    Ok(products.len() as f64 / start.elapsed().as_secs_f64())
}

/// The hand-written statement for one chunk of rows.
async fn upsert(db: &DatabaseConnection, chunk: &[Product]) -> anyhow::Result<()> {
    {
        let mut sql = String::from(
            "INSERT INTO baseline_products (code, product_type, brand, category_path, status, \
             names, descriptions, prices, attributes, version, create_time, update_time) VALUES ",
        );
        let mut values: Vec<SqlValue> = Vec::with_capacity(chunk.len() * 12);
        for (i, p) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push(',');
            }
            let base = i * 12;
            sql.push('(');
            for column in 1..=12 {
                if column > 1 {
                    sql.push(',');
                }
                write!(sql, "${}", base + column)?;
            }
            sql.push(')');
            let now = 1_800_000_000_000_000i64;
            values.extend([
                p.code.clone().into(),
                p.product_type.clone().into(),
                p.brand.clone().into(),
                serde_json::to_string(&p.category_path)?.into(),
                (p.status as i16).into(),
                serde_json::to_string(&p.names)?.into(),
                serde_json::to_string(&p.descriptions)?.into(),
                serde_json::to_string(&p.prices)?.into(),
                serde_json::Value::Object(mall_product::attributes::to_json(
                    p.attributes.as_ref().expect("set"),
                ))
                .to_string()
                .into(),
                (p.version as i64).into(),
                now.into(),
                now.into(),
            ]);
        }
        sql.push_str(
            " ON CONFLICT (code) DO UPDATE SET product_type = excluded.product_type, \
             brand = excluded.brand, category_path = excluded.category_path, \
             status = excluded.status, names = excluded.names, \
             descriptions = excluded.descriptions, prices = excluded.prices, \
             attributes = excluded.attributes, version = excluded.version, \
             update_time = excluded.update_time \
             WHERE baseline_products.version < excluded.version",
        );
        db.execute_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            sql,
            values,
        ))
        .await?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct Reads {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

/// GetProduct of random products from `concurrency` tasks, through [`measure`].
async fn get_products(concurrency: usize, client: &ProductCatalogServiceClient<Channel>) -> Reads {
    let client = client.clone();
    measure(concurrency, move || {
        let mut client = client.clone();
        async move {
            let code = bench::code(fastrand::usize(..PRODUCTS));
            client
                .get_product(GetProductRequest { code })
                .await
                .map(|_| ())
        }
    })
    .await
}

/// Runs `call` from `concurrency` tasks for [`READ_WINDOW`]; throughput and latency.
async fn measure<F, Fut>(concurrency: usize, call: F) -> Reads
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send,
{
    // Warm up connections and caches.
    for _ in 0..50 {
        call().await.expect("call succeeds");
    }
    let end = Instant::now() + READ_WINDOW;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < end {
                    let start = Instant::now();
                    call().await.expect("call succeeds");
                    latencies.push(start.elapsed());
                }
                latencies
            })
        })
        .collect();
    let start = Instant::now();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("task joins"));
    }
    let elapsed = start.elapsed().max(READ_WINDOW);
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Reads {
        rate: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn write_report(
    bulk_rounds: &[(usize, Vec<(f64, f64)>)],
    reads: &[(usize, Reads, Reads, Reads)],
    (get, health, written): (Reads, Reads, f64),
) -> anyhow::Result<()> {
    let mut section = String::new();
    writeln!(section, "## product-catalog\n")?;
    writeln!(section, "{}\n", bench::machine())?;
    writeln!(
        section,
        "Command: `scripts/bench.sh catalog` (PostgreSQL {} on the same machine, catalog \
         server and load generator in one process, release build).\n",
        bench::postgres_version()
    )?;
    writeln!(
        section,
        "### BulkUpdateProducts vs one hand-written upsert statement\n\n\
         {PRODUCTS} apparel products (about 700 bytes each) in requests of {BATCH}, {ROUNDS} rounds \
         per level of requests in flight (both paths at the same level); the very first round \
         inserts, every other round updates every product to a newer version (median shown). \
         The baseline is one `INSERT ... VALUES (1,000 rows) ON CONFLICT DO UPDATE \
         WHERE version < excluded.version` per {BATCH} rows, through the same driver, into a \
         table of the same shape, rows encoded the same way. BulkUpdateProducts also \
         encodes, sends and decodes the gRPC request, validates it, locks and reads the stored \
         rows, plans each item under the version guard and appends every applied change to \
         the change log (a second row per item), all in one transaction. Since the per-field \
         version guard, each row also carries seven field versions (19 values a row).\n"
    )?;
    writeln!(
        section,
        "| requests in flight | phase | BulkUpdateProducts rows/s | hand-written upsert rows/s | ratio (target ≥ 0.5) |\n|---|---|---|---|---|"
    )?;
    for (index, (in_flight, rounds)) in bulk_rounds.iter().enumerate() {
        let mut phases = Vec::new();
        let updates = if index == 0 {
            phases.push(("insert (first round)", rounds[0]));
            &rounds[1..]
        } else {
            &rounds[..]
        };
        let bulk: Vec<f64> = updates.iter().map(|r| r.0).collect();
        let sql: Vec<f64> = updates.iter().map(|r| r.1).collect();
        phases.push(("update (median)", (median(&bulk), median(&sql))));
        for (name, (bulk, sql)) in phases {
            writeln!(
                section,
                "| {in_flight} | {name} | {bulk:.0} | {sql:.0} | {:.2} |",
                bulk / sql
            )?;
        }
    }
    writeln!(
        section,
        "\nEvery round (BulkUpdateProducts / hand-written):\n"
    )?;
    for (in_flight, rounds) in bulk_rounds {
        writeln!(
            section,
            "- {in_flight} in flight: {}",
            rounds
                .iter()
                .map(|(b, s)| format!("{b:.0} / {s:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
    }
    writeln!(section)?;
    writeln!(
        section,
        "### GetProduct vs the trivial RPC (health Check) on the same server\n\n\
         Random codes among {PRODUCTS}; each level runs {}s per RPC, one HTTP/2 connection per \
         server. GetProduct is served by the read cache (`catalog.read_cache_entries`, set to \
         {} here, warmed with BatchGetProducts first); \"from the database\" is a second replica on the \
         same database with the cache off (`read_cache_entries = 0`), for comparison. The \
         ratio is cached GetProduct over Check.\n",
        READ_WINDOW.as_secs(),
        2 * PRODUCTS
    )?;
    writeln!(
        section,
        "| callers | GetProduct /s | p50 | p99 | from the database /s | p50 | p99 | Check /s | p50 | p99 | ratio (target ≥ 0.6) |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )?;
    for (concurrency, get, from_database, health) in reads {
        writeln!(
            section,
            "| {concurrency} | {:.0} | {} | {} | {:.0} | {} | {} | {:.0} | {} | {} | {:.2} |",
            get.rate,
            ms(get.p50),
            ms(get.p99),
            from_database.rate,
            ms(from_database.p50),
            ms(from_database.p99),
            health.rate,
            ms(health.p50),
            ms(health.p99),
            get.rate / health.rate
        )?;
    }
    writeln!(
        section,
        "\n### GetProduct while the relay's load is written\n\n\
         {UNDER_WRITE_CONCURRENCY} callers for {}s each, GetProduct then Check, while \
         BulkUpdateProducts writes partial changes (prices) of {WRITE_BATCH} random products \
         per request, paced at {WRITE_LOAD} changes/s ({written:.0}/s achieved). Each write \
         invalidates its products in the read cache; the others stay cached.\n",
        READ_WINDOW.as_secs()
    )?;
    writeln!(
        section,
        "| GetProduct /s | p50 | p99 | Check /s | p50 | p99 | ratio (target ≥ 0.6) |\n|---|---|---|---|---|---|---|\n\
         | {:.0} | {} | {} | {:.0} | {} | {} | {:.2} |",
        get.rate,
        ms(get.p50),
        ms(get.p99),
        health.rate,
        ms(health.p50),
        ms(health.p99),
        get.rate / health.rate
    )?;
    bench::replace_section("product-catalog", &section)
}

fn ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1000.0)
}
