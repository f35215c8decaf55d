//! Schema migrations of `member-export`, applied at start-up by `mall_db::connect`.

use sea_orm_migration::{MigrationTrait, MigratorTrait};

/// The ordered list of migrations; none yet: the service keeps no state until a later issue.
#[derive(Debug)]
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        Vec::new()
    }
}
