//! Schema migrations of `member-export`, applied at start-up by `mall_db::connect`.
//!
//! Every migration runs on SQLite and PostgreSQL alike (sea-query's schema builder).

use sea_orm_migration::{MigrationTrait, MigratorTrait};

mod m20261202_000001_members;
mod m20261202_000002_failed_deliveries;
mod m20261202_000003_alert_windows;
mod m20261202_000004_member_erasure;
mod m20261202_000005_delivery_attempts;
mod m20261203_000006_rate_limit_and_jobs;

/// The ordered list of migrations.
#[derive(Debug)]
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut migrations: Vec<Box<dyn MigrationTrait>> = vec![
            Box::new(m20261202_000001_members::Migration),
            Box::new(m20261202_000002_failed_deliveries::Migration),
            Box::new(m20261202_000003_alert_windows::Migration),
            Box::new(m20261202_000004_member_erasure::Migration),
            Box::new(m20261202_000005_delivery_attempts::Migration),
            Box::new(m20261203_000006_rate_limit_and_jobs::Migration),
        ];
        // The embedded queue's tables live in this database (unused with SQS).
        migrations.extend(mall_queue::embedded::migrations());
        migrations
    }
}
