//! `kinesis_shards`: one row per shard of each Kinesis stream the relay reads, holding the
//! shard's lineage (for parent-before-child order), its checkpoint, its lease and its lag.
//! See `crate::source::kinesis::lease` for how the rows are used.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(super) struct Migration;

#[derive(DeriveIden)]
enum KinesisShards {
    Table,
    StreamName,
    ShardId,
    ParentShardId,
    AdjacentParentShardId,
    CheckpointSequenceNumber,
    Finished,
    ReplayFromMs,
    Epoch,
    LeaseOwner,
    LeaseExpiresMs,
    LeaseCounter,
    LagMillis,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(KinesisShards::Table)
                    .if_not_exists()
                    // Stream names and shard ids are at most 128 characters in Kinesis.
                    .col(
                        ColumnDef::new(KinesisShards::StreamName)
                            .string_len(128)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(KinesisShards::ShardId)
                            .string_len(128)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(KinesisShards::ParentShardId)
                            .string_len(128)
                            .null(),
                    )
                    .col(
                        ColumnDef::new(KinesisShards::AdjacentParentShardId)
                            .string_len(128)
                            .null(),
                    )
                    // Sequence numbers are decimal strings of up to 128 digits.
                    .col(
                        ColumnDef::new(KinesisShards::CheckpointSequenceNumber)
                            .string_len(128)
                            .null(),
                    )
                    .col(
                        ColumnDef::new(KinesisShards::Finished)
                            .boolean()
                            .not_null()
                            .default(false),
                    )
                    // Times are Unix milliseconds: compared the same way on both engines.
                    .col(
                        ColumnDef::new(KinesisShards::ReplayFromMs)
                            .big_integer()
                            .null(),
                    )
                    .col(
                        ColumnDef::new(KinesisShards::Epoch)
                            .big_integer()
                            .not_null()
                            .default(0),
                    )
                    .col(
                        ColumnDef::new(KinesisShards::LeaseOwner)
                            .string_len(255)
                            .null(),
                    )
                    .col(
                        ColumnDef::new(KinesisShards::LeaseExpiresMs)
                            .big_integer()
                            .null(),
                    )
                    .col(
                        ColumnDef::new(KinesisShards::LeaseCounter)
                            .big_integer()
                            .not_null()
                            .default(0),
                    )
                    .col(
                        ColumnDef::new(KinesisShards::LagMillis)
                            .big_integer()
                            .not_null()
                            .default(0),
                    )
                    .primary_key(
                        Index::create()
                            .col(KinesisShards::StreamName)
                            .col(KinesisShards::ShardId),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(KinesisShards::Table).to_owned())
            .await
    }
}
