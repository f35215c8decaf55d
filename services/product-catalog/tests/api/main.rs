//! Integration tests of the catalog API, through the generated gRPC client, against the real
//! `App` on 127.0.0.1:0. Every test runs on SQLite and on PostgreSQL (`both_engines!`).

mod helpers;

mod bulk;
mod commute;
mod concurrency;
mod import;
mod limits;
mod list;
mod reads;
mod tls;
mod watch;
