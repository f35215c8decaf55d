//! The embedded queue's tables, as a sea-orm migration a service adds to its own Migrator.
//!
//! ```text
//! mall_queue_messages                       one row per message, live or dead
//!   id             bigint pk, autoincrement order of sending; a group's head is its lowest live id
//!   queue          text      which queue (several share one database)
//!   message_id     text      uuid given at send, kept across redeliveries and redrives
//!   group_id       text      FIFO group; '' for standard queues
//!   dedup_id       text?     deduplication id as sent (information only)
//!   body           text
//!   attributes     text      JSON object of string attributes
//!   sent_at        bigint    ms since the Unix epoch
//!   visible_at     bigint    ms; > now means in flight
//!   receive_count  integer   deliveries so far
//!   receipt        text?     token of the latest delivery; a receipt is "<id>.<token>"
//!   dead           smallint  1 once dead-lettered
//!   dead_at        bigint?   ms when dead-lettered
//!   xid            bigint    PostgreSQL: the sending transaction's id (0 on SQLite and for
//!                            rows older than the column); a group's order is (xid, id)
//! indexes: (queue, dead, group_id, xid, id) group heads and order;
//!          (queue, dead, group_id, id) (before xid; kept for SQLite's order);
//!          (queue, dead, visible_at)   standard receives and counts;
//!          (queue, dead, receive_count) finding messages to dead-letter.
//!
//! mall_queue_dedup                          FIFO deduplication ids within their window
//!   (queue, dedup_id) pk, expires_at bigint ms; index (queue, expires_at) for pruning
//! ```

use sea_orm_migration::{
    MigrationName, MigrationTrait, SchemaManager, async_trait,
    prelude::{ColumnDef, DeriveIden, Index, Table},
    sea_orm::{ConnectionTrait as _, DbErr},
};

/// The migration's name: dated like the services' own but in a slot of its own
/// (`..._1000xx_queue_...`), so it never collides with theirs.
pub const MIGRATION_NAME: &str = "m20261125_100001_queue_messages";

/// The migrations that create the embedded queue's tables, for a service's Migrator:
///
/// ```ignore
/// fn migrations() -> Vec<Box<dyn MigrationTrait>> {
///     let mut all: Vec<Box<dyn MigrationTrait>> = vec![Box::new(m20261125_000001_products::Migration)];
///     all.extend(mall_queue::embedded::migrations());
///     all
/// }
/// ```
pub fn migrations() -> Vec<Box<dyn MigrationTrait>> {
    vec![Box::new(CreateQueueTables), Box::new(CommitOrder)]
}

/// Orders a group by the sending transaction's id on PostgreSQL, so sends need no lock that
/// makes them commit one at a time (see `receive` in the module above).
struct CommitOrder;

impl MigrationName for CommitOrder {
    fn name(&self) -> &str {
        "m20261202_100001_queue_commit_order"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CommitOrder {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Messages::Table)
                    .add_column(
                        ColumnDef::new(Messages::Xid)
                            .big_integer()
                            .not_null()
                            .default(0),
                    )
                    .to_owned(),
            )
            .await?;
        if manager.get_database_backend() == sea_orm_migration::sea_orm::DbBackend::Postgres {
            // Rows already queued keep 0 and so come first, in id order, as before.
            manager
                .get_connection()
                .execute_unprepared(
                    "ALTER TABLE mall_queue_messages \
                     ALTER COLUMN xid SET DEFAULT (pg_current_xact_id()::text::bigint)",
                )
                .await?;
        }
        manager
            .create_index(
                Index::create()
                    .name("idx_mall_queue_messages_group_order")
                    .table(Messages::Table)
                    .if_not_exists()
                    .col(Messages::Queue)
                    .col(Messages::Dead)
                    .col(Messages::GroupId)
                    .col(Messages::Xid)
                    .col(Messages::Id)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("idx_mall_queue_messages_group_order")
                    .table(Messages::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Messages::Table)
                    .drop_column(Messages::Xid)
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum Messages {
    #[sea_orm(iden = "mall_queue_messages")]
    Table,
    Id,
    Queue,
    MessageId,
    GroupId,
    DedupId,
    Body,
    Attributes,
    SentAt,
    VisibleAt,
    ReceiveCount,
    Receipt,
    Dead,
    DeadAt,
    Xid,
}

#[derive(DeriveIden)]
enum Dedup {
    #[sea_orm(iden = "mall_queue_dedup")]
    Table,
    Queue,
    #[sea_orm(iden = "dedup_id")]
    Id,
    ExpiresAt,
}

struct CreateQueueTables;

impl MigrationName for CreateQueueTables {
    fn name(&self) -> &str {
        MIGRATION_NAME
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateQueueTables {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Messages::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(Messages::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Messages::Queue).string_len(80).not_null())
                    .col(
                        ColumnDef::new(Messages::MessageId)
                            .string_len(64)
                            .not_null(),
                    )
                    .col(ColumnDef::new(Messages::GroupId).string_len(128).not_null())
                    .col(ColumnDef::new(Messages::DedupId).string_len(128).null())
                    .col(ColumnDef::new(Messages::Body).text().not_null())
                    .col(ColumnDef::new(Messages::Attributes).text().not_null())
                    .col(ColumnDef::new(Messages::SentAt).big_integer().not_null())
                    .col(ColumnDef::new(Messages::VisibleAt).big_integer().not_null())
                    .col(
                        ColumnDef::new(Messages::ReceiveCount)
                            .integer()
                            .not_null()
                            .default(0),
                    )
                    .col(ColumnDef::new(Messages::Receipt).string_len(64).null())
                    .col(
                        ColumnDef::new(Messages::Dead)
                            .small_integer()
                            .not_null()
                            .default(0),
                    )
                    .col(ColumnDef::new(Messages::DeadAt).big_integer().null())
                    .to_owned(),
            )
            .await?;
        let indexes = [
            (
                "idx_mall_queue_messages_group_head",
                [
                    Messages::Queue,
                    Messages::Dead,
                    Messages::GroupId,
                    Messages::Id,
                ],
            ),
            (
                "idx_mall_queue_messages_visible",
                [
                    Messages::Queue,
                    Messages::Dead,
                    Messages::VisibleAt,
                    Messages::Id,
                ],
            ),
            (
                "idx_mall_queue_messages_receive_count",
                [
                    Messages::Queue,
                    Messages::Dead,
                    Messages::ReceiveCount,
                    Messages::Id,
                ],
            ),
        ];
        for (name, columns) in indexes {
            let mut index = Index::create();
            index.name(name).table(Messages::Table).if_not_exists();
            for column in columns {
                index.col(column);
            }
            manager.create_index(index).await?;
        }

        manager
            .create_table(
                Table::create()
                    .table(Dedup::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(Dedup::Queue).string_len(80).not_null())
                    .col(ColumnDef::new(Dedup::Id).string_len(128).not_null())
                    .col(ColumnDef::new(Dedup::ExpiresAt).big_integer().not_null())
                    .primary_key(Index::create().col(Dedup::Queue).col(Dedup::Id))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_mall_queue_dedup_expires")
                    .table(Dedup::Table)
                    .if_not_exists()
                    .col(Dedup::Queue)
                    .col(Dedup::ExpiresAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Dedup::Table).if_exists().to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Messages::Table).if_exists().to_owned())
            .await
    }
}
