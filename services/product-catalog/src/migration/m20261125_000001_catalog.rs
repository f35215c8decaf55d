//! Products, their change log, and remembered bulk-update request ids.
//!
//! Times are microseconds since the Unix epoch in BIGINT columns on both engines, so
//! comparisons and keyset positions behave the same on SQLite and PostgreSQL.

use sea_orm::DbBackend;
use sea_orm_migration::{
    prelude::*,
    schema::{big_integer, big_pk_auto, blob, blob_null, integer, small_integer, text},
};

/// Creates the catalog's tables.
#[derive(Debug)]
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261125_000001_catalog"
    }
}

#[derive(DeriveIden)]
enum Products {
    Table,
    Code,
    ProductType,
    Brand,
    CategoryPath,
    Status,
    Names,
    Descriptions,
    Prices,
    Attributes,
    Version,
    CreateTime,
    UpdateTime,
}

#[derive(DeriveIden)]
enum ProductChanges {
    Table,
    Seq,
    Code,
    ProductType,
    Version,
    PreviousVersion,
    CommitTime,
    Product,
}

#[derive(DeriveIden)]
enum ChangeLogState {
    Table,
    Id,
    PrunedThrough,
}

#[derive(DeriveIden)]
enum BulkRequests {
    Table,
    RequestId,
    Response,
    CreateTime,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let mut code = text(Products::Code);
        code.primary_key();
        // ListProducts promises byte order; PostgreSQL's default collation is the locale's.
        if manager.get_database_backend() == DbBackend::Postgres {
            code.extra("COLLATE \"C\"");
        }
        manager
            .create_table(
                Table::create()
                    .table(Products::Table)
                    .col(code)
                    .col(text(Products::ProductType))
                    .col(text(Products::Brand))
                    // JSON text: readable with any SQL client, and never queried inside.
                    .col(text(Products::CategoryPath))
                    .col(small_integer(Products::Status))
                    .col(text(Products::Names))
                    .col(text(Products::Descriptions))
                    .col(text(Products::Prices))
                    .col(text(Products::Attributes))
                    .col(big_integer(Products::Version))
                    .col(big_integer(Products::CreateTime))
                    .col(big_integer(Products::UpdateTime))
                    .to_owned(),
            )
            .await?;
        // Keyset pages of a filtered list walk these in code order.
        for (name, column) in [
            ("products_type_code", Products::ProductType),
            ("products_brand_code", Products::Brand),
            ("products_status_code", Products::Status),
        ] {
            manager
                .create_index(
                    Index::create()
                        .name(name)
                        .table(Products::Table)
                        .col(column)
                        .col(Products::Code)
                        .to_owned(),
                )
                .await?;
        }
        manager
            .create_index(
                Index::create()
                    .name("products_update_time")
                    .table(Products::Table)
                    .col(Products::UpdateTime)
                    .to_owned(),
            )
            .await?;

        // The change log: one row per applied item, written in the same transaction. On
        // SQLite the key is AUTOINCREMENT, so a sequence number is never reused even after
        // the log is pruned empty: cursors stay valid.
        manager
            .create_table(
                Table::create()
                    .table(ProductChanges::Table)
                    .col(big_pk_auto(ProductChanges::Seq))
                    .col(text(ProductChanges::Code))
                    .col(text(ProductChanges::ProductType))
                    .col(big_integer(ProductChanges::Version))
                    .col(big_integer(ProductChanges::PreviousVersion))
                    .col(big_integer(ProductChanges::CommitTime))
                    // The product after the change, protobuf-encoded (mall.catalog.v1.Product).
                    .col(blob(ProductChanges::Product))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("product_changes_commit_time")
                    .table(ProductChanges::Table)
                    .col(ProductChanges::CommitTime)
                    .to_owned(),
            )
            .await?;

        // Highest sequence number pruned so far: a cursor at or below it is OUT_OF_RANGE.
        manager
            .create_table(
                Table::create()
                    .table(ChangeLogState::Table)
                    .col(integer(ChangeLogState::Id).primary_key())
                    .col(big_integer(ChangeLogState::PrunedThrough))
                    .to_owned(),
            )
            .await?;
        manager
            .exec_stmt(
                Query::insert()
                    .into_table(ChangeLogState::Table)
                    .columns([ChangeLogState::Id, ChangeLogState::PrunedThrough])
                    .values_panic([1.into(), 0i64.into()])
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(BulkRequests::Table)
                    .col(text(BulkRequests::RequestId).primary_key())
                    // The first response, protobuf-encoded; written in the same transaction.
                    .col(blob_null(BulkRequests::Response))
                    .col(big_integer(BulkRequests::CreateTime))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("bulk_requests_create_time")
                    .table(BulkRequests::Table)
                    .col(BulkRequests::CreateTime)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            BulkRequests::Table.into_iden(),
            ChangeLogState::Table.into_iden(),
            ProductChanges::Table.into_iden(),
            Products::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).to_owned())
                .await?;
        }
        Ok(())
    }
}
