//! Deliveries the partner refused for the member's own fault: member id, version, a reason
//! code and the time, never the profile. The failover job "failed deliveries" reads them.

use sea_orm_migration::{
    prelude::*,
    schema::{big_integer, big_pk_auto, text},
};

/// Creates `failed_deliveries`.
#[derive(Debug)]
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261202_000002_failed_deliveries"
    }
}

#[derive(DeriveIden)]
enum FailedDeliveries {
    Table,
    Seq,
    MemberId,
    Version,
    Reason,
    FailTime,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(FailedDeliveries::Table)
                    .col(big_pk_auto(FailedDeliveries::Seq))
                    .col(text(FailedDeliveries::MemberId))
                    .col(big_integer(FailedDeliveries::Version))
                    .col(text(FailedDeliveries::Reason))
                    .col(big_integer(FailedDeliveries::FailTime))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("failed_deliveries_member")
                    .table(FailedDeliveries::Table)
                    .col(FailedDeliveries::MemberId)
                    .col(FailedDeliveries::Seq)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(FailedDeliveries::Table).to_owned())
            .await
    }
}
