//! Schema migrations of `product-catalog`, applied at start-up by `mall_db::connect`.

use sea_orm_migration::{MigrationTrait, MigratorTrait};

/// The ordered list of migrations; none yet: the service keeps no state until issue 3.
#[derive(Debug)]
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        Vec::new()
    }
}
