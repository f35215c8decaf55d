//! Schema migrations of `sync-relay`, applied at start-up by `mall_db::connect`.
//!
//! Every migration runs on SQLite and PostgreSQL alike, so it is written with sea-query's
//! schema builder rather than SQL text.

use sea_orm_migration::{MigrationTrait, MigratorTrait};

mod m20261125_000001_kinesis_shards;

/// The ordered list of migrations.
#[derive(Debug)]
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(m20261125_000001_kinesis_shards::Migration)]
    }
}
