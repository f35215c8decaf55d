//! The relay's own state: quarantined records, the shared pause switch, the last error of
//! each failing queue message, and remembered admin request ids.

use sea_orm_migration::{
    prelude::*,
    schema::{big_integer, big_pk_auto, blob, blob_null, boolean, integer, text},
};

/// Creates the relay's tables.
#[derive(Debug)]
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261125_000002_relay"
    }
}

#[derive(DeriveIden)]
enum QuarantinedRecords {
    Table,
    Seq,
    DedupKey,
    Source,
    Position,
    Reason,
    RawPayload,
    QuarantineTime,
}

#[derive(DeriveIden)]
enum RelayState {
    Table,
    Id,
    Paused,
    PauseReason,
    UpdateTime,
}

#[derive(DeriveIden)]
enum ApplyFailures {
    Table,
    MessageId,
    LastError,
    UpdateTime,
}

#[derive(DeriveIden)]
enum AdminRequests {
    Table,
    RequestId,
    Response,
    CreateTime,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // Oldest first by `seq`; `dedup_key` makes quarantining a redelivered record a no-op.
        manager
            .create_table(
                Table::create()
                    .table(QuarantinedRecords::Table)
                    .col(big_pk_auto(QuarantinedRecords::Seq))
                    .col(text(QuarantinedRecords::DedupKey).unique_key())
                    .col(text(QuarantinedRecords::Source))
                    .col(text(QuarantinedRecords::Position))
                    .col(text(QuarantinedRecords::Reason))
                    .col(blob(QuarantinedRecords::RawPayload))
                    .col(big_integer(QuarantinedRecords::QuarantineTime))
                    .to_owned(),
            )
            .await?;
        // One row: the pause switch every replica follows.
        manager
            .create_table(
                Table::create()
                    .table(RelayState::Table)
                    .col(integer(RelayState::Id).primary_key())
                    .col(boolean(RelayState::Paused))
                    .col(text(RelayState::PauseReason))
                    .col(big_integer(RelayState::UpdateTime))
                    .to_owned(),
            )
            .await?;
        manager
            .exec_stmt(
                Query::insert()
                    .into_table(RelayState::Table)
                    .columns([
                        RelayState::Id,
                        RelayState::Paused,
                        RelayState::PauseReason,
                        RelayState::UpdateTime,
                    ])
                    .values_panic([1.into(), false.into(), "".into(), 0i64.into()])
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(ApplyFailures::Table)
                    .col(text(ApplyFailures::MessageId).primary_key())
                    .col(text(ApplyFailures::LastError))
                    .col(big_integer(ApplyFailures::UpdateTime))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AdminRequests::Table)
                    .col(text(AdminRequests::RequestId).primary_key())
                    .col(blob_null(AdminRequests::Response))
                    .col(big_integer(AdminRequests::CreateTime))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            AdminRequests::Table.into_iden(),
            ApplyFailures::Table.into_iden(),
            RelayState::Table.into_iden(),
            QuarantinedRecords::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).to_owned())
                .await?;
        }
        Ok(())
    }
}
