//! Schema migrations of `sync-relay`, applied at start-up by `mall_db::connect`.
//!
//! Every migration runs on SQLite and PostgreSQL alike, so it is written with sea-query's
//! schema builder rather than SQL text.

use sea_orm_migration::{MigrationTrait, MigratorTrait};

mod m20261125_000001_kinesis_shards;
mod m20261125_000002_relay;

/// The ordered list of migrations.
#[derive(Debug)]
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut migrations: Vec<Box<dyn MigrationTrait>> = vec![
            Box::new(m20261125_000001_kinesis_shards::Migration),
            Box::new(m20261125_000002_relay::Migration),
        ];
        // The embedded queue's tables live in the relay's database (unused with SQS).
        migrations.extend(mall_queue::embedded::migrations());
        migrations
    }
}
