//! The change log's order without a lock that serializes writers.
//!
//! Until now every PostgreSQL writer took one advisory lock before appending to the change
//! log, so sequence numbers became visible in commit order; that lock made every writer's
//! commit wait for the previous one. Writers now commit in parallel, and the log is read in
//! the order of `(xid, seq)` below a commit-order watermark (see `store::changes`):
//! - `product_changes.xid`: the writing transaction's id (`pg_current_xact_id()`, a 64-bit
//!   id that never wraps); 0 on SQLite, whose single writer makes `seq` order commit order,
//!   and 0 for entries written before this migration, which keeps their order and the
//!   cursors already issued for them;
//! - `products.write_xid`: the transaction that last wrote a product; a writer whose own id
//!   is lower retries, so one product's changes are in `xid` order;
//! - `change_log_state.pruned_xid`: the prune mark becomes a `(xid, seq)` position.

use sea_orm_migration::{prelude::*, schema::big_integer};

/// Adds the commit-order columns.
#[derive(Debug)]
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261202_000001_commit_order"
    }
}

#[derive(DeriveIden)]
enum Products {
    Table,
    WriteXid,
}

#[derive(DeriveIden)]
enum ProductChanges {
    Table,
    Xid,
    Seq,
}

#[derive(DeriveIden)]
enum ChangeLogState {
    Table,
    PrunedXid,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let add = [
            (Products::Table.into_iden(), Products::WriteXid.into_iden()),
            (
                ProductChanges::Table.into_iden(),
                ProductChanges::Xid.into_iden(),
            ),
            (
                ChangeLogState::Table.into_iden(),
                ChangeLogState::PrunedXid.into_iden(),
            ),
        ];
        for (table, column) in add {
            manager
                .alter_table(
                    Table::alter()
                        .table(table)
                        .add_column(big_integer(column).default(0))
                        .to_owned(),
                )
                .await?;
        }
        if manager.get_database_backend() == sea_orm::DbBackend::Postgres {
            // Existing entries keep 0; new ones carry their transaction's id.
            manager
                .get_connection()
                .execute_unprepared(
                    "ALTER TABLE product_changes \
                     ALTER COLUMN xid SET DEFAULT (pg_current_xact_id()::text::bigint)",
                )
                .await?;
        }
        manager
            .create_index(
                Index::create()
                    .name("product_changes_xid_seq")
                    .table(ProductChanges::Table)
                    .col(ProductChanges::Xid)
                    .col(ProductChanges::Seq)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("product_changes_xid_seq")
                    .table(ProductChanges::Table)
                    .to_owned(),
            )
            .await?;
        let drop = [
            (Products::Table.into_iden(), Products::WriteXid.into_iden()),
            (
                ProductChanges::Table.into_iden(),
                ProductChanges::Xid.into_iden(),
            ),
            (
                ChangeLogState::Table.into_iden(),
                ChangeLogState::PrunedXid.into_iden(),
            ),
        ];
        for (table, column) in drop {
            manager
                .alter_table(Table::alter().table(table).drop_column(column).to_owned())
                .await?;
        }
        Ok(())
    }
}
