//! Three things that replicas share:
//! - `rate_limits`: the partner's request rate as one GCRA state (the theoretical arrival time
//!   of the next request) and the backed-off rate after a 429 or −1004;
//! - `members.send_owner` / `members.send_until`: who is sending a member right now, so two
//!   requests for one member are never in flight at once (a newer version overtaken by an
//!   older one would leave the partner with stale data);
//! - `failover_jobs`: the failover jobs, their checkpoints and their leases.

use sea_orm_migration::{
    prelude::*,
    schema::{big_integer, double_null, integer, text, text_null},
};

/// Creates the tables and the columns.
#[derive(Debug)]
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261203_000006_rate_limit_and_jobs"
    }
}

#[derive(DeriveIden)]
enum RateLimits {
    Table,
    Name,
    NextMicros,
    BackoffRate,
    BackoffMicros,
}

#[derive(DeriveIden)]
enum Members {
    Table,
    SendOwner,
    SendUntil,
}

#[derive(DeriveIden)]
enum FailoverJobs {
    Table,
    JobId,
    RequestId,
    Kind,
    State,
    ScopeStart,
    ScopeEnd,
    TotalCount,
    ProcessedCount,
    FailedCount,
    CreateTime,
    UpdateTime,
    Error,
    CursorTime,
    CursorMember,
    LeaseOwner,
    LeaseUntil,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(RateLimits::Table)
                    .col(text(RateLimits::Name).primary_key())
                    .col(big_integer(RateLimits::NextMicros))
                    .col(double_null(RateLimits::BackoffRate))
                    .col(big_integer(RateLimits::BackoffMicros))
                    .to_owned(),
            )
            .await?;
        // One column per statement: SQLite alters one column at a time.
        for column in [Members::SendOwner, Members::SendUntil] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Members::Table)
                        .add_column(big_integer(column).default(0))
                        .to_owned(),
                )
                .await?;
        }
        manager
            .create_table(
                Table::create()
                    .table(FailoverJobs::Table)
                    .col(text(FailoverJobs::JobId).primary_key())
                    .col(text_null(FailoverJobs::RequestId).unique_key())
                    .col(integer(FailoverJobs::Kind))
                    .col(integer(FailoverJobs::State))
                    .col(big_integer(FailoverJobs::ScopeStart))
                    .col(big_integer(FailoverJobs::ScopeEnd))
                    .col(big_integer(FailoverJobs::TotalCount))
                    .col(big_integer(FailoverJobs::ProcessedCount))
                    .col(big_integer(FailoverJobs::FailedCount))
                    .col(big_integer(FailoverJobs::CreateTime))
                    .col(big_integer(FailoverJobs::UpdateTime))
                    .col(text(FailoverJobs::Error))
                    .col(big_integer(FailoverJobs::CursorTime))
                    .col(text(FailoverJobs::CursorMember))
                    .col(big_integer(FailoverJobs::LeaseOwner))
                    .col(big_integer(FailoverJobs::LeaseUntil))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("failover_jobs_state")
                    .table(FailoverJobs::Table)
                    .col(FailoverJobs::State)
                    .col(FailoverJobs::CreateTime)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(FailoverJobs::Table).to_owned())
            .await?;
        for column in [Members::SendOwner, Members::SendUntil] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Members::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        manager
            .drop_table(Table::drop().table(RateLimits::Table).to_owned())
            .await
    }
}
