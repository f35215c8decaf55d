//! What the partner may have: `members.attempted_version` is the newest version ever sent to
//! the partner (recorded before the request, so a crash between the partner's acceptance and
//! our record cannot hide that it may have the member), and `members.erase_delivered` says
//! the partner accepted the member's erasure.

use sea_orm_migration::{
    prelude::*,
    schema::{big_integer, boolean},
};

/// Adds the two columns.
#[derive(Debug)]
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261202_000005_delivery_attempts"
    }
}

#[derive(DeriveIden)]
enum Members {
    Table,
    AttemptedVersion,
    EraseDelivered,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters one column at a time.
        manager
            .alter_table(
                Table::alter()
                    .table(Members::Table)
                    .add_column(big_integer(Members::AttemptedVersion).default(0))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Members::Table)
                    .add_column(boolean(Members::EraseDelivered).default(false))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in [Members::AttemptedVersion, Members::EraseDelivered] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Members::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}
