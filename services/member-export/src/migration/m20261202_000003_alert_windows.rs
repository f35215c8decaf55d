//! The alert cap shared by every replica: per time window, alerts sent and suppressed, and
//! whether the suppressed ones were summed up.

use sea_orm_migration::{
    prelude::*,
    schema::{big_integer, boolean, integer},
};

/// Creates `alert_windows`.
#[derive(Debug)]
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261202_000003_alert_windows"
    }
}

#[derive(DeriveIden)]
enum AlertWindows {
    Table,
    WindowStart,
    Sent,
    Suppressed,
    Summarized,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(AlertWindows::Table)
                    .col(big_integer(AlertWindows::WindowStart).primary_key())
                    .col(integer(AlertWindows::Sent))
                    .col(integer(AlertWindows::Suppressed))
                    .col(boolean(AlertWindows::Summarized))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(AlertWindows::Table).to_owned())
            .await
    }
}
