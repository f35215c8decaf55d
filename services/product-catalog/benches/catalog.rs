//! Benchmark of the catalog on PostgreSQL, each figure next to a baseline measured in the
//! same run, so the ratio means something on a noisy machine:
//!
//! 1. BulkUpdateProducts with 1,000-item requests (rows/s) at 1 and 4 requests in flight, and
//!    ImportProducts (one stream), next to the limit of the work: the same rows written with
//!    sqlx directly, a binary COPY into a temporary table, then one `INSERT ... SELECT ... ON
//!    CONFLICT DO UPDATE` with the per-field version guard and the change log appended from
//!    its `RETURNING`, 1,000 rows per transaction (no gRPC, no validation, no planning). A
//!    second baseline is one hand-written multi-row `INSERT ... VALUES ... ON CONFLICT DO
//!    UPDATE` statement through sea-orm;
//! 2. GetProduct requests/s and p50/p99 latency at several concurrency levels, next to the
//!    trivial RPC of the same server (grpc.health.v1 Check);
//! 3. the same at 32 callers while BulkUpdateProducts writes 5,000 partial changes/s (the
//!    relay's steady load, shaped as its lanes send it: see [`WRITE_LANES`]), so the cost of
//!    writes to the read cache and the cores shows;
//! 4. on SQLite, BulkUpdateProducts next to prepared statements (one guarded upsert and one
//!    change-log insert per row) in one transaction per 1,000 rows.
//!
//! Run with `scripts/bench.sh catalog` (it provides PostgreSQL); the results replace the
//! product-catalog section of BENCHMARKS.md. `scripts/bench.sh catalog bulk`, `reads` or
//! `sqlite` runs only 1, 3 or 4 and prints it (for profiling or an A/B of one path).

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use futures::{StreamExt as _, TryStreamExt as _};
use mall_proto::catalog::v1::{
    BulkUpdateProductsRequest, GetProductRequest, Product, ProductUpdate, UpdateOutcome,
    product_catalog_service_client::ProductCatalogServiceClient,
};
use mall_test_support::{
    TestDatabase,
    bench::{self, CpuSample},
    probe, wait_until,
};
use product_catalog::{App, Settings};
use sea_orm::{ConnectionTrait as _, Database, DatabaseConnection, Statement, Value as SqlValue};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Products in the catalog while measuring.
const PRODUCTS: usize = 20_000;
/// Items per BulkUpdateProducts request (the contract's maximum).
const BATCH: usize = 1_000;
/// Rounds of bulk writes (each round rewrites every product with a newer version). The
/// paths take turns going first, so each goes first, second and third three times (the
/// update median at one in flight leaves out the inserting first round). Nine, not five: on these 2-core machines single rounds' ratios spread over ± 0.25 (the COPY
/// baseline alone from 19,000 to 38,000 rows/s within one run, as PostgreSQL checkpoints
/// land in one round or another), and the median of five moved by ± 0.1 from run to run.
const ROUNDS: u64 = 9;
/// Requests in flight at once in the bulk comparison, for every path: one after another, and
/// four (how the relay's consumers call it).
const IN_FLIGHT: [usize; 2] = [1, 4];
/// Messages ImportProducts commits at once (the server's `WRITES_IN_FLIGHT`), so its
/// baseline runs at that concurrency too.
const IMPORT_WRITES_IN_FLIGHT: usize = 2;
/// How long each read measurement runs.
const READ_WINDOW: Duration = Duration::from_secs(4);
/// Concurrent callers for the read measurements.
const CONCURRENCY: [usize; 4] = [1, 8, 32, 128];
/// Changes per second written during the read-under-write measurement.
const WRITE_LOAD: usize = 5_000;
/// Lanes of that write load. As the relay's FIFO lanes do, each lane writes only its own
/// products (index ≡ lane mod this), one request at a time, so two writes in flight never
/// touch one product. (Random products from 8 requests in flight made requests wait for
/// each other's row locks, a wait the relay never causes: p50 167 ms per 100-change request,
/// and only ~3,900 changes/s written.)
const WRITE_LANES: usize = 8;
/// Changes per request of a lane on time; a late lane sends what accrued, up to [`BATCH`],
/// as the relay's roll-up does while its apply is busy.
const WRITE_BATCH: usize = 100;
/// Callers of the read-under-write measurement.
const UNDER_WRITE_CONCURRENCY: usize = 32;

/// The allocator the service binary uses, so the benchmark measures what runs in production.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    // As the service's binary does (see `mall_grpc::process`).
    mall_grpc::process::disable_transparent_huge_pages();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    // `scripts/bench.sh catalog sqlite` (or `bulk`, below): one comparison, printed, not
    // reported (for profiling one path).
    if std::env::args().any(|a| a == "sqlite") {
        sqlite_bulk().await?;
        return Ok(());
    }
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
        .execute_unprepared(
            "CREATE TABLE baseline_products (LIKE products INCLUDING ALL); \
             CREATE TABLE copy_products (LIKE products INCLUDING ALL); \
             CREATE TABLE copy_changes (LIKE product_changes INCLUDING ALL)",
        )
        .await?;
    let copy_pool = sea_orm::sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(database.url())
        .await?;

    // The benchmark's database, whose PostgreSQL backends' CPU is counted per path.
    let databases: Vec<String> = database
        .url()
        .rsplit_once('/')
        .map(|(_, name)| name.to_owned())
        .into_iter()
        .collect();
    let channel = probe::channel(addr);
    let catalog = ProductCatalogServiceClient::new(channel.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let uncached = ProductCatalogServiceClient::new(probe::channel(uncached_addr));

    // `scripts/bench.sh catalog reads`: only the reads while writing, printed (one import
    // fills the catalog first).
    if std::env::args().any(|a| a == "reads") {
        let products: Vec<Product> = (0..PRODUCTS).map(|i| bench::product(i, 1)).collect();
        import_products(&catalog, &products).await?;
        warm(&catalog).await?;
        reads_under_write(&catalog, &channel, addr, 2).await?;
        shutdown.cancel();
        server.await??;
        uncached_server.await??;
        return Ok(());
    }

    eprintln!("bulk: {ROUNDS} rounds of {PRODUCTS} products in requests of {BATCH}");
    let mut bulk_rounds = Vec::new();
    let mut version = 0;
    for in_flight in IN_FLIGHT {
        let mut rounds = Vec::new();
        for round in 1..=ROUNDS {
            version += 1;
            let products: Vec<Product> =
                (0..PRODUCTS).map(|i| bench::product(i, version)).collect();
            // Rotate which goes first, so none always meets a warmer machine.
            let mut round_figures = [0.0; 3];
            let mut costs = [Cost::default(); 3];
            for turn in 0..3 {
                let which = (turn + round as usize) % 3;
                let prepared = (which == 0).then(|| requests(&products));
                let before = (Instant::now(), CpuSample::now(&databases));
                round_figures[which] = match which {
                    0 => bulk_update(&catalog, prepared.unwrap_or_default(), in_flight).await?,
                    1 => copy_baseline(&copy_pool, &products, in_flight).await?,
                    _ => hand_written(&baseline, &products, in_flight).await?,
                };
                costs[which] = Cost::of(before, PRODUCTS, &databases);
            }
            let [bulk, copy, sql] = round_figures;
            eprintln!(
                "  {in_flight} in flight, round {round}: BulkUpdateProducts {bulk:.0} rows/s \
                 ({}), COPY baseline {copy:.0} rows/s ({}), hand-written upsert {sql:.0} rows/s \
                 ({})",
                costs[0].describe(),
                costs[1].describe(),
                costs[2].describe()
            );
            rounds.push(Figures {
                bulk,
                copy,
                sql,
                costs,
            });
        }
        bulk_rounds.push((in_flight, rounds));
    }
    // `scripts/bench.sh catalog bulk`: only the PostgreSQL bulk comparison, printed.
    if std::env::args().any(|a| a == "bulk") {
        shutdown.cancel();
        return Ok(());
    }
    eprintln!("import: {ROUNDS} rounds of {PRODUCTS} products in one stream");
    let mut imports = Vec::new();
    for round in 1..=ROUNDS {
        version += 1;
        let products: Vec<Product> = (0..PRODUCTS).map(|i| bench::product(i, version)).collect();
        // Rotate which goes first, as above.
        let mut figures = [0.0; 3];
        for turn in 0..3 {
            let which = (turn + round as usize) % 3;
            figures[which] = match which {
                0 => import_products(&catalog, &products).await?,
                1 => copy_baseline(&copy_pool, &products, 1).await?,
                _ => copy_baseline(&copy_pool, &products, IMPORT_WRITES_IN_FLIGHT).await?,
            };
        }
        let [import, copy, copy_parallel] = figures;
        eprintln!(
            "  round {round}: ImportProducts {import:.0} rows/s, COPY baseline {copy:.0} rows/s \
             (1 in flight), {copy_parallel:.0} rows/s ({IMPORT_WRITES_IN_FLIGHT} in flight)"
        );
        imports.push(figures);
    }

    warm(&catalog).await?;

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

    let under_write = reads_under_write(&catalog, &channel, addr, version + 1).await?;

    shutdown.cancel();
    server.await??;
    uncached_server.await??;

    let sqlite_rounds = sqlite_bulk().await?;
    write_report(&bulk_rounds, &imports, &sqlite_rounds, &reads, under_write)
}

/// Fills the read cache (BatchGetProducts fills it too), as a running catalog's would be.
async fn warm(catalog: &ProductCatalogServiceClient<Channel>) -> anyhow::Result<()> {
    let codes: Vec<String> = (0..PRODUCTS).map(bench::code).collect();
    for chunk in codes.chunks(BATCH) {
        catalog
            .clone()
            .batch_get_products(mall_proto::catalog::v1::BatchGetProductsRequest {
                codes: chunk.to_vec(),
            })
            .await?;
    }
    Ok(())
}

/// GetProduct and health Check from [`UNDER_WRITE_CONCURRENCY`] callers while
/// [`write_load`] writes from `first_version` up on a connection of its own (the relay is
/// another client than the readers); (GetProduct, Check, changes/s written).
async fn reads_under_write(
    catalog: &ProductCatalogServiceClient<Channel>,
    channel: &Channel,
    addr: std::net::SocketAddr,
    first_version: u64,
) -> anyhow::Result<(Reads, Reads, Written)> {
    eprintln!("reads while {WRITE_LOAD} changes/s are written");
    let stop_writing = CancellationToken::new();
    let writer = tokio::spawn(write_load(
        ProductCatalogServiceClient::new(probe::channel(addr)),
        first_version,
        stop_writing.clone(),
    ));
    let get = get_products(UNDER_WRITE_CONCURRENCY, catalog).await;
    let health = health_checks(UNDER_WRITE_CONCURRENCY, channel).await;
    stop_writing.cancel();
    let written = writer.await??;
    eprintln!(
        "  GetProduct {:.0}/s p99 {:?}; Check {:.0}/s p99 {:?}; {:.0} changes/s written, \
         {:.0} per request, p50 {:?} p99 {:?}",
        get.rate,
        get.p99,
        health.rate,
        health.p99,
        written.rate,
        written.per_request,
        written.p50,
        written.p99
    );
    Ok((get, health, written))
}

/// BulkUpdateProducts on SQLite next to its limit, [`ROUNDS`] rounds of (BulkUpdateProducts,
/// prepared statements) rows/s at one request in flight (SQLite has one writer).
async fn sqlite_bulk() -> anyhow::Result<Vec<(f64, f64)>> {
    use sea_orm::sqlx::{Executor as _, Row as _};
    let database = TestDatabase::sqlite();
    let mut settings = Settings::default();
    settings.server.listen_addr = "127.0.0.1:0".parse()?;
    settings.server.admin_addr = "127.0.0.1:0".parse()?;
    settings.database.url = database.url().to_owned().into();
    settings.telemetry.log_filter = "warn".into();
    let app = App::build(settings).await?;
    let addr = app.grpc_addr();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(app.run_until(shutdown.clone().cancelled_owned()));
    wait_until(
        "the SQLite catalog serves",
        Duration::from_secs(30),
        || async { probe::health(addr, "").await.map(|_| ()) },
    )
    .await;
    let catalog = ProductCatalogServiceClient::new(probe::channel(addr))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);

    // The baseline's tables: the catalog's own schema (tables and indexes) under other names,
    // in the same file.
    let pool = sea_orm::sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect(database.url())
        .await?;
    let path = database
        .url()
        .strip_prefix("sqlite://")
        .and_then(|rest| rest.split('?').next())
        .ok_or_else(|| anyhow::anyhow!("a SQLite file url: {}", database.url()))?
        .to_owned();
    let schema = sea_orm::sqlx::query(
        "SELECT sql FROM sqlite_master WHERE tbl_name IN ('products', 'product_changes') \
         AND sql IS NOT NULL",
    )
    .fetch_all(&pool)
    .await?;
    for row in schema {
        let sql: String = row.try_get(0)?;
        let sql = sql
            .replace("\"products\"", "\"copy_products\"")
            .replace("\"product_changes\"", "\"copy_changes\"")
            .replace("CREATE INDEX \"", "CREATE INDEX \"copy_")
            .replace("CREATE UNIQUE INDEX \"", "CREATE UNIQUE INDEX \"copy_");
        pool.execute(sea_orm::sqlx::AssertSqlSafe(sql)).await?;
    }

    eprintln!("SQLite bulk: {ROUNDS} rounds of {PRODUCTS} products");
    let mut rounds = Vec::new();
    for round in 1..=ROUNDS {
        let products: Vec<Product> = (0..PRODUCTS).map(|i| bench::product(i, round)).collect();
        let (bulk, prepared) = if round % 2 == 0 {
            let prepared = prepared_statements(&path, &products).await?;
            (
                bulk_update(&catalog, requests(&products), 1).await?,
                prepared,
            )
        } else {
            let bulk = bulk_update(&catalog, requests(&products), 1).await?;
            (bulk, prepared_statements(&path, &products).await?)
        };
        eprintln!(
            "  round {round}: BulkUpdateProducts {bulk:.0} rows/s, prepared {prepared:.0} rows/s"
        );
        rounds.push((bulk, prepared));
    }
    shutdown.cancel();
    server.await??;
    Ok(rounds)
}

/// The SQLite limit: per [`BATCH`] rows one transaction of prepared statements through
/// rusqlite (SQLite's C API with no driver between), one guarded `INSERT ... ON CONFLICT DO
/// UPDATE` and one change-log insert per row; rows/s. Rows are encoded in the timed region.
async fn prepared_statements(path: &str, products: &[Product]) -> anyhow::Result<f64> {
    let path = path.to_owned();
    let products = products.to_vec();
    tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
        let mut db = rusqlite::Connection::open(path)?;
        db.busy_timeout(Duration::from_secs(10))?;
        let set = guarded_set("copy_products", "MAX");
        let upsert = format!(
            "INSERT INTO copy_products ({COPY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, \
             ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (code) DO UPDATE SET {set}, \
             version = MAX(excluded.version, copy_products.version), \
             update_time = excluded.update_time WHERE copy_products.version < excluded.version"
        );
        let log = "INSERT INTO copy_changes (code, product_type, version, previous_version, \
                   commit_time, product, written_fields, change_version) \
                   VALUES (?, ?, ?, 0, ?, ?, 127, ?)";
        let start = Instant::now();
        let now = 1_800_000_000_000_000i64;
        for chunk in products.chunks(BATCH) {
            let txn = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            {
                let mut upsert = txn.prepare_cached(&upsert)?;
                let mut log = txn.prepare_cached(log)?;
                for p in chunk {
                    let version = p.version as i64;
                    let attributes = mall_product::attributes::to_json_text(p.attributes.as_ref());
                    upsert.execute(rusqlite::params![
                        p.code,
                        p.product_type,
                        p.brand,
                        serde_json::to_string(&p.category_path)?,
                        p.status,
                        serde_json::to_string(&p.names)?,
                        serde_json::to_string(&p.descriptions)?,
                        serde_json::to_string(&p.prices)?,
                        attributes,
                        version,
                        now,
                        now,
                        version,
                        version,
                        version,
                        version,
                        version,
                        version,
                        version,
                    ])?;
                    log.execute(rusqlite::params![
                        p.code,
                        p.product_type,
                        version,
                        now,
                        prost::Message::encode_to_vec(p),
                        version,
                    ])?;
                }
            }
            txn.commit()?;
        }
        Ok(products.len() as f64 / start.elapsed().as_secs_f64())
    })
    .await?
}

/// One round's rows/s: BulkUpdateProducts, the COPY baseline, the hand-written statement;
/// and what each cost in CPU, in that order.
#[derive(Debug, Clone, Copy)]
struct Figures {
    bulk: f64,
    copy: f64,
    sql: f64,
    costs: [Cost; 3],
}

/// CPU milliseconds per 1,000 rows written: this process (load generator, gRPC on both ends
/// and the catalog; or the baseline's client) and the PostgreSQL backends of the benchmark's
/// database. What limits a path when it runs requests in parallel on 2 cores is their sum.
#[derive(Debug, Clone, Copy, Default)]
struct Cost {
    process: f64,
    postgres: f64,
}

impl Cost {
    /// The cost of writing `rows` since `before`.
    fn of(before: (Instant, CpuSample), rows: usize, databases: &[String]) -> Self {
        let (start, sample) = before;
        let wall = start.elapsed();
        let used = sample.since(&CpuSample::now(databases), wall);
        // Cores × seconds = CPU seconds; per 1,000 rows in milliseconds.
        let per_1000 = |cores: f64| cores * wall.as_secs_f64() * 1e6 / rows as f64;
        Self {
            process: per_1000(used.bench),
            postgres: per_1000(used.postgres),
        }
    }

    fn describe(&self) -> String {
        format!(
            "CPU per 1,000 rows: process {:.0} ms, PostgreSQL {:.0} ms",
            self.process, self.postgres
        )
    }
}

/// Streams every product through ImportProducts, [`BATCH`] per message; rows/s.
async fn import_products(
    client: &ProductCatalogServiceClient<Channel>,
    products: &[Product],
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let messages: Vec<_> = products
        .chunks(BATCH)
        .map(|chunk| mall_proto::catalog::v1::ImportProductsRequest {
            products: chunk.to_vec(),
        })
        .collect();
    let response = client
        .clone()
        .import_products(futures::stream::iter(messages))
        .await?
        .into_inner();
    anyhow::ensure!(
        response.invalid_count == 0,
        "the import refused {} products",
        response.invalid_count
    );
    Ok(products.len() as f64 / start.elapsed().as_secs_f64())
}

/// The limit of the work, written with sqlx directly; rows/s. Per [`BATCH`] rows, one
/// transaction: a binary COPY of the rows (as the catalog stores them, encoded in the timed
/// region, with the encoded product the change log keeps) into a temporary table, one
/// `INSERT ... SELECT ... ON CONFLICT DO UPDATE` with the per-field version guard whose
/// `RETURNING` feeds the change-log insert in the same statement, commit.
async fn copy_baseline(
    pool: &sea_orm::sqlx::PgPool,
    products: &[Product],
    in_flight: usize,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    futures::stream::iter(products.chunks(BATCH).map(Ok))
        .try_for_each_concurrent(in_flight, |chunk| copy_chunk(pool, chunk))
        .await?;
    Ok(products.len() as f64 / start.elapsed().as_secs_f64())
}

/// The `SET` list of an upsert with the per-field version guard: each field (the mask's
/// paths) takes the incoming value only where the incoming field version is newer than the
/// stored one in `table`; `max` is the dialect's greater-of-two function.
fn guarded_set(table: &str, max: &str) -> String {
    mall_product::mask::PATHS
        .map(|field| {
            format!(
                "{field} = CASE WHEN excluded.{field}_version > {table}.{field}_version \
                 THEN excluded.{field} ELSE {table}.{field} END, \
                 {field}_version = {max}(excluded.{field}_version, {table}.{field}_version)"
            )
        })
        .join(", ")
}

/// The columns the COPY baseline writes, in COPY order.
const COPY_COLUMNS: &str = "code, product_type, brand, category_path, status, names, \
    descriptions, prices, attributes, version, create_time, update_time, brand_version, \
    category_path_version, status_version, names_version, descriptions_version, \
    prices_version, attributes_version";

async fn copy_chunk(pool: &sea_orm::sqlx::PgPool, chunk: &[Product]) -> anyhow::Result<()> {
    use sea_orm::sqlx::Executor as _;
    let mut data = Vec::with_capacity(chunk.len() * 1024);
    data.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    data.extend_from_slice(&0i32.to_be_bytes()); // flags
    data.extend_from_slice(&0i32.to_be_bytes()); // header extension
    let now = 1_800_000_000_000_000i64;
    for p in chunk {
        let version = p.version as i64;
        let text = |data: &mut Vec<u8>, value: &str| {
            data.extend_from_slice(&(value.len() as i32).to_be_bytes());
            data.extend_from_slice(value.as_bytes());
        };
        let int8 = |data: &mut Vec<u8>, value: i64| {
            data.extend_from_slice(&8i32.to_be_bytes());
            data.extend_from_slice(&value.to_be_bytes());
        };
        data.extend_from_slice(&20i16.to_be_bytes());
        text(&mut data, &p.code);
        text(&mut data, &p.product_type);
        text(&mut data, &p.brand);
        text(&mut data, &serde_json::to_string(&p.category_path)?);
        data.extend_from_slice(&2i32.to_be_bytes());
        data.extend_from_slice(&(p.status as i16).to_be_bytes());
        text(&mut data, &serde_json::to_string(&p.names)?);
        text(&mut data, &serde_json::to_string(&p.descriptions)?);
        text(&mut data, &serde_json::to_string(&p.prices)?);
        text(
            &mut data,
            &mall_product::attributes::to_json_text(p.attributes.as_ref()),
        );
        int8(&mut data, version);
        int8(&mut data, now);
        int8(&mut data, now);
        for _ in 0..7 {
            int8(&mut data, version);
        }
        let encoded = prost::Message::encode_to_vec(p);
        data.extend_from_slice(&(encoded.len() as i32).to_be_bytes());
        data.extend_from_slice(&encoded);
    }
    data.extend_from_slice(&(-1i16).to_be_bytes());

    let mut txn = pool.begin().await?;
    txn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS copy_input \
         (LIKE copy_products INCLUDING DEFAULTS, product bytea) ON COMMIT DELETE ROWS",
    )
    .await?;
    let mut copy = txn
        .copy_in_raw(&format!(
            "COPY copy_input ({COPY_COLUMNS}, product) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    copy.send(data).await?;
    copy.finish().await?;
    let set = guarded_set("t", "GREATEST");
    let upsert = format!(
        "WITH written AS ( \
               INSERT INTO copy_products AS t ({COPY_COLUMNS}) \
               SELECT {COPY_COLUMNS} FROM copy_input \
               ON CONFLICT (code) DO UPDATE SET {set}, \
                 version = GREATEST(excluded.version, t.version), \
                 update_time = excluded.update_time \
               WHERE t.version < excluded.version \
               RETURNING t.code, t.product_type, t.version, t.update_time) \
             INSERT INTO copy_changes (code, product_type, version, previous_version, \
               commit_time, product, written_fields, change_version) \
             SELECT w.code, w.product_type, w.version, 0, w.update_time, i.product, 127, \
               w.version FROM written w JOIN copy_input i USING (code)"
    );
    txn.execute(sea_orm::sqlx::AssertSqlSafe(upsert)).await?;
    txn.commit().await?;
    Ok(())
}

/// What [`write_load`] wrote: changes/s, changes per request, request latency.
struct Written {
    rate: f64,
    per_request: f64,
    p50: Duration,
    p99: Duration,
}

/// Writes [`WRITE_LOAD`] partial changes (prices) per second from [`WRITE_LANES`] lanes
/// (see there), from `first_version` up, until `stop`.
async fn write_load(
    client: ProductCatalogServiceClient<Channel>,
    first_version: u64,
    stop: CancellationToken,
) -> anyhow::Result<Written> {
    let start = Instant::now();
    let lanes: Vec<_> = (0..WRITE_LANES)
        .map(|lane| {
            tokio::spawn(write_lane(
                client.clone(),
                lane,
                first_version,
                stop.clone(),
            ))
        })
        .collect();
    let (mut written, mut latencies) = (0, Vec::new());
    for lane in lanes {
        let (lane_written, lane_latencies) = lane.await??;
        written += lane_written;
        latencies.extend(lane_latencies);
    }
    let elapsed = start.elapsed();
    anyhow::ensure!(!latencies.is_empty(), "the write load sent no request");
    latencies.sort_unstable();
    Ok(Written {
        rate: written as f64 / elapsed.as_secs_f64(),
        per_request: written as f64 / latencies.len() as f64,
        p50: quantile(&latencies, 0.50),
        p99: quantile(&latencies, 0.99),
    })
}

/// One lane of [`write_load`]: every `WRITE_BATCH / rate` it sends the changes that accrued
/// at its share of [`WRITE_LOAD`] (at most [`BATCH`]), cycling through its products; the
/// changes written and each request's latency.
async fn write_lane(
    mut client: ProductCatalogServiceClient<Channel>,
    lane: usize,
    mut version: u64,
    stop: CancellationToken,
) -> anyhow::Result<(usize, Vec<Duration>)> {
    let per_second = WRITE_LOAD as f64 / WRITE_LANES as f64;
    let products: Vec<usize> = (lane..PRODUCTS).step_by(WRITE_LANES).collect();
    // The lanes' ticks are spread over the period, as independent lanes' would be, rather
    // than all eight requests sent at once.
    let period = Duration::from_secs_f64(WRITE_BATCH as f64 / per_second);
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + period.mul_f64(lane as f64 / WRITE_LANES as f64),
        period,
    );
    // A late request makes the next one larger (below), not a burst of catching-up requests.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = Instant::now();
    let (mut written, mut latencies) = (0, Vec::new());
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let due = ((start.elapsed().as_secs_f64() * per_second) as usize).saturating_sub(written);
        let count = due.min(BATCH);
        if count == 0 {
            continue;
        }
        version += 1;
        let updates = (written..written + count)
            .map(|n| ProductUpdate {
                product: Some(bench::product(products[n % products.len()], version)),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["prices".into()],
                }),
            })
            .collect();
        let sent = Instant::now();
        let response = client
            .bulk_update_products(BulkUpdateProductsRequest {
                request_id: String::new(),
                product_type: "apparel".into(),
                updates,
            })
            .await?;
        latencies.push(sent.elapsed());
        // A load of stale changes would cost the catalog less than the relay's does.
        anyhow::ensure!(
            response
                .get_ref()
                .results
                .iter()
                .all(|r| r.outcome() == UpdateOutcome::Applied),
            "every change of the write load applies"
        );
        written += count;
    }
    Ok((written, latencies))
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

/// BulkUpdateProducts requests of [`BATCH`] full replacements of `products`.
fn requests(products: &[Product]) -> Vec<BulkUpdateProductsRequest> {
    products
        .chunks(BATCH)
        .map(|chunk| BulkUpdateProductsRequest {
            request_id: String::new(),
            product_type: "apparel".into(),
            updates: chunk
                .iter()
                .map(|p| ProductUpdate {
                    product: Some(p.clone()),
                    update_mask: None,
                })
                .collect(),
        })
        .collect()
}

/// Sends `requests` with `in_flight` at once; rows/s. The caller builds them before the clock
/// (and the CPU count) starts, as the baselines get their rows: what is timed is encoding,
/// sending and applying them, not this client copying its products into messages.
async fn bulk_update(
    client: &ProductCatalogServiceClient<Channel>,
    requests: Vec<BulkUpdateProductsRequest>,
    in_flight: usize,
) -> anyhow::Result<f64> {
    let rows: usize = requests.iter().map(|r| r.updates.len()).sum();
    let start = Instant::now();
    let calls = requests.into_iter().map(|request| {
        let mut client = client.clone();
        async move { client.bulk_update_products(request).await.map(drop) }
    });
    futures::stream::iter(calls)
        .buffer_unordered(in_flight)
        .try_collect::<()>()
        .await?;
    Ok(rows as f64 / start.elapsed().as_secs_f64())
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
                mall_product::attributes::to_json_text(p.attributes.as_ref()).into(),
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
    Reads {
        rate: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: quantile(&latencies, 0.50),
        p99: quantile(&latencies, 0.99),
    }
}

/// The `q` quantile of `sorted` (not empty), nearest rank.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

/// The median; of an even count, the mean of the middle two (the update rounds at one in
/// flight and on SQLite leave out the inserting first round, so they are even).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    }
}

fn write_report(
    bulk_rounds: &[(usize, Vec<Figures>)],
    imports: &[[f64; 3]],
    sqlite_rounds: &[(f64, f64)],
    reads: &[(usize, Reads, Reads, Reads)],
    (get, health, written): (Reads, Reads, Written),
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
        "### BulkUpdateProducts and ImportProducts vs the limit of the work\n\n\
         {PRODUCTS} apparel products (about 700 bytes each) in requests of {BATCH}, {ROUNDS} rounds \
         per level of requests in flight (every path at the same level, the order rotated each \
         round); the very first round inserts, every other round updates every product to a \
         newer version (median shown).\n\n\
         - **COPY baseline** (the limit): the same rows written with sqlx directly, per {BATCH} \
         rows one transaction: a binary COPY into a temporary table, then one `INSERT ... \
         SELECT ... ON CONFLICT DO UPDATE` with the per-field version guard in the statement \
         and the change log appended from its `RETURNING` (rows and the encoded product \
         prepared in the timed region; no gRPC, no validation, no planning).\n\
         - **hand-written VALUES**: one `INSERT ... VALUES (1,000 rows) ON CONFLICT DO UPDATE \
         WHERE version < excluded.version` per {BATCH} rows through sea-orm, without field \
         versions or change log (the baseline of earlier runs).\n\
         - BulkUpdateProducts also encodes, sends and decodes the gRPC request, validates it, \
         locks and reads the stored rows' field versions, plans each item in memory, and \
         writes rows, change log and request id in one statement of array parameters. \
         Its client builds the request messages from the products before the clock starts \
         (as the baselines get their rows); encoding and sending them is timed.\n"
    )?;
    writeln!(
        section,
        "| requests in flight | phase | BulkUpdateProducts rows/s | COPY baseline rows/s | ratio (target ≥ 0.6 at 1, ≥ 0.8 at 4) | hand-written VALUES rows/s | ratio |\n|---|---|---|---|---|---|---|"
    )?;
    let mut costs = Vec::new();
    for (index, (in_flight, rounds)) in bulk_rounds.iter().enumerate() {
        let mut phases = Vec::new();
        let updates = if index == 0 {
            phases.push(("insert (first round)", rounds[0]));
            &rounds[1..]
        } else {
            &rounds[..]
        };
        let column =
            |f: &dyn Fn(&Figures) -> f64| median(&updates.iter().map(f).collect::<Vec<_>>());
        let cost = |i: usize| Cost {
            process: column(&|r| r.costs[i].process),
            postgres: column(&|r| r.costs[i].postgres),
        };
        phases.push((
            "update (median)",
            Figures {
                bulk: column(&|r| r.bulk),
                copy: column(&|r| r.copy),
                sql: column(&|r| r.sql),
                costs: [cost(0), cost(1), cost(2)],
            },
        ));
        costs.push((*in_flight, phases.clone()));
        for (name, f) in phases {
            writeln!(
                section,
                "| {in_flight} | {name} | {:.0} | {:.0} | **{:.2}** | {:.0} | {:.2} |",
                f.bulk,
                f.copy,
                f.bulk / f.copy,
                f.sql,
                f.bulk / f.sql
            )?;
        }
    }
    writeln!(
        section,
        "\nCPU milliseconds per 1,000 rows, this process (load generator, gRPC client and \
         server, catalog; or the baseline's client) + the PostgreSQL backends of the \
         benchmark's database, same rounds as above. With requests in parallel on 2 cores a \
         path's rate is bounded by its sum; one request at a time, also by the round trips \
         that leave a core idle.\n\n\
         | requests in flight | phase | BulkUpdateProducts | COPY baseline | hand-written VALUES \
         |\n|---|---|---|---|---|"
    )?;
    for (in_flight, phases) in &costs {
        for (name, f) in phases {
            let cell = |c: &Cost| {
                format!(
                    "{:.0} + {:.0} = {:.0}",
                    c.process,
                    c.postgres,
                    c.process + c.postgres
                )
            };
            writeln!(
                section,
                "| {in_flight} | {name} | {} | {} | {} |",
                cell(&f.costs[0]),
                cell(&f.costs[1]),
                cell(&f.costs[2])
            )?;
        }
    }
    writeln!(
        section,
        "\nEvery round (BulkUpdateProducts / COPY baseline / hand-written VALUES):\n"
    )?;
    for (in_flight, rounds) in bulk_rounds {
        writeln!(
            section,
            "- {in_flight} in flight: {}",
            rounds
                .iter()
                .map(|f| format!("{:.0} / {:.0} / {:.0}", f.bulk, f.copy, f.sql))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
    }
    let import = median(&imports.iter().map(|r| r[0]).collect::<Vec<_>>());
    let copy = median(&imports.iter().map(|r| r[1]).collect::<Vec<_>>());
    let copy_parallel = median(&imports.iter().map(|r| r[2]).collect::<Vec<_>>());
    writeln!(
        section,
        "\nImportProducts: one stream of {PRODUCTS} products, {BATCH} per message (each \
         message one transaction; the server reads the next message while up to \
         {IMPORT_WRITES_IN_FLIGHT} commit), every round a full replacement at a newer version, \
         next to the COPY baseline at 1 and at {IMPORT_WRITES_IN_FLIGHT} transactions in \
         flight.\n\n\
         | ImportProducts rows/s | COPY baseline, 1 in flight | ratio (target ≥ 0.8) | COPY \
         baseline, {IMPORT_WRITES_IN_FLIGHT} in flight | ratio |\n|---|---|---|---|---|\n\
         | {import:.0} | {copy:.0} | **{:.2}** | {copy_parallel:.0} | **{:.2}** |\n\n\
         Every round (ImportProducts / COPY 1 in flight / COPY {IMPORT_WRITES_IN_FLIGHT} in \
         flight): {}\n",
        import / copy,
        import / copy_parallel,
        imports
            .iter()
            .map(|[i, c, p]| format!("{i:.0} / {c:.0} / {p:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    let bulk = median(&sqlite_rounds[1..].iter().map(|r| r.0).collect::<Vec<_>>());
    let prepared = median(&sqlite_rounds[1..].iter().map(|r| r.1).collect::<Vec<_>>());
    writeln!(
        section,
        "### BulkUpdateProducts on SQLite vs prepared statements\n\n\
         The same {PRODUCTS} products on SQLite (a file, WAL), one request of {BATCH} in flight \
         (one writer), {ROUNDS} rounds, the first inserting. The baseline is the limit on \
         SQLite: per {BATCH} rows one transaction of prepared statements through rusqlite \
         (the C API, no async driver between), one \
         `INSERT ... ON CONFLICT DO UPDATE` with the per-field guard and one change-log \
         insert per row, into tables with the catalog's schema in the same file.\n\n\
         | phase | BulkUpdateProducts rows/s | prepared statements rows/s | ratio (target ≥ 0.6) |\n|---|---|---|---|\n\
         | insert (first round) | {:.0} | {:.0} | {:.2} |\n\
         | update (median) | {bulk:.0} | {prepared:.0} | **{:.2}** |\n",
        sqlite_rounds[0].0,
        sqlite_rounds[0].1,
        sqlite_rounds[0].0 / sqlite_rounds[0].1,
        bulk / prepared
    )?;
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
         BulkUpdateProducts writes partial changes (prices) at {WRITE_LOAD} changes/s on a \
         connection of its own, as the relay does: {WRITE_LANES} lanes, each writing its own \
         products one request at a time, {WRITE_BATCH} changes per request when on time and \
         what accrued (up to {BATCH}) when late. Achieved: {:.0} changes/s, {:.0} per request, \
         write latency p50 {} p99 {}. Each write puts its products in the read cache; the \
         others stay cached.\n",
        READ_WINDOW.as_secs(),
        written.rate,
        written.per_request,
        ms(written.p50),
        ms(written.p99)
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
