//! Schema migrations of `product-catalog`, applied at start-up by `mall_db::connect`.
//!
//! Migrations are append-only: a released one is never edited, a change is a new one.

use sea_orm_migration::{MigrationTrait, MigratorTrait};

mod m20261125_000001_catalog;
pub mod m20261130_000001_field_versions;
mod m20261202_000001_commit_order;

/// The ordered list of migrations.
#[derive(Debug)]
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261125_000001_catalog::Migration),
            Box::new(m20261130_000001_field_versions::Migration),
            Box::new(m20261202_000001_commit_order::Migration),
        ]
    }
}
