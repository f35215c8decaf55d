//! Per-field versions: each writable field of a product keeps the version of the change that
//! last wrote it, so writes commute (see `mall_product::mask`). Existing rows get every field
//! at the row's version, which is what the row-level guard meant. The change log learns which
//! fields each change wrote and the change's own version; existing entries were whole-product
//! writes at their version.
//!
//! A row whose `status` is 0 (never written) is a pending product: partial changes that came
//! before the change creating it; the existing `(status, code)` index finds them.

use sea_orm_migration::{
    prelude::*,
    schema::{big_integer, small_integer},
};

/// Adds the field-version columns.
#[derive(Debug)]
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261130_000001_field_versions"
    }
}

/// The field-version columns, in `mall_product::mask::PATHS` order.
pub const FIELD_VERSION_COLUMNS: [&str; 7] = [
    "brand_version",
    "category_path_version",
    "status_version",
    "names_version",
    "descriptions_version",
    "prices_version",
    "attributes_version",
];

#[derive(DeriveIden)]
enum Products {
    Table,
}

#[derive(DeriveIden)]
enum ProductChanges {
    Table,
    WrittenFields,
    ChangeVersion,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == sea_orm::DbBackend::Postgres {
            // Runs in the migration's transaction: rewriting every row of a large catalog
            // may take longer than the pool's statement timeout.
            manager
                .get_connection()
                .execute_unprepared("SET LOCAL statement_timeout = 0")
                .await?;
        }
        // One column per statement: SQLite's ALTER TABLE adds one at a time.
        for column in FIELD_VERSION_COLUMNS {
            manager
                .alter_table(
                    Table::alter()
                        .table(Products::Table)
                        .add_column(big_integer(Alias::new(column)).default(0))
                        .to_owned(),
                )
                .await?;
        }
        let set: Vec<String> = FIELD_VERSION_COLUMNS
            .iter()
            .map(|c| format!("{c} = version"))
            .collect();
        manager
            .get_connection()
            .execute_unprepared(&format!("UPDATE products SET {}", set.join(", ")))
            .await?;
        // Bits of the fields written, bit i for PATHS[i]; 127 is every field.
        manager
            .alter_table(
                Table::alter()
                    .table(ProductChanges::Table)
                    .add_column(small_integer(ProductChanges::WrittenFields).default(127))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(ProductChanges::Table)
                    .add_column(big_integer(ProductChanges::ChangeVersion).default(0))
                    .to_owned(),
            )
            .await?;
        manager
            .get_connection()
            .execute_unprepared("UPDATE product_changes SET change_version = version")
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in [ProductChanges::WrittenFields, ProductChanges::ChangeVersion] {
            manager
                .alter_table(
                    Table::alter()
                        .table(ProductChanges::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        for column in FIELD_VERSION_COLUMNS {
            manager
                .alter_table(
                    Table::alter()
                        .table(Products::Table)
                        .drop_column(Alias::new(column))
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}
