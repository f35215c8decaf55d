//! Tombstones: `members.erased` marks a member erased at its `version` (profile and consent
//! deleted; only the id and the version remain).

use sea_orm_migration::{prelude::*, schema::boolean};

/// Adds `members.erased`.
#[derive(Debug)]
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261202_000004_member_erasure"
    }
}

#[derive(DeriveIden)]
enum Members {
    Table,
    Erased,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Members::Table)
                    .add_column(boolean(Members::Erased).default(false))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Members::Table)
                    .drop_column(Members::Erased)
                    .to_owned(),
            )
            .await
    }
}
