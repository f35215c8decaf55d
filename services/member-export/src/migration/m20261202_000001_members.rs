//! The member table (each member's newest recorded change, its consent, its encrypted
//! profile, and what was queued and delivered) and the remembered EnqueueMemberChanges
//! request ids.

use sea_orm_migration::{
    prelude::*,
    schema::{big_integer, blob, blob_null, boolean, text, text_null},
};

/// Creates the member tables.
#[derive(Debug)]
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261202_000001_members"
    }
}

#[derive(DeriveIden)]
enum Members {
    Table,
    MemberId,
    Version,
    ConsentEmail,
    ConsentSms,
    ConsentPush,
    ConsentTime,
    ChangeTime,
    Profile,
    KeyId,
    QueuedVersion,
    DeliveredVersion,
    UpdateTime,
}

#[derive(DeriveIden)]
enum EnqueueRequests {
    Table,
    RequestId,
    Response,
    CreateTime,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Members::Table)
                    .col(text(Members::MemberId).primary_key())
                    .col(big_integer(Members::Version))
                    .col(boolean(Members::ConsentEmail))
                    .col(boolean(Members::ConsentSms))
                    .col(boolean(Members::ConsentPush))
                    .col(big_integer(Members::ConsentTime))
                    .col(big_integer(Members::ChangeTime))
                    .col(blob_null(Members::Profile))
                    .col(text_null(Members::KeyId))
                    .col(big_integer(Members::QueuedVersion))
                    .col(big_integer(Members::DeliveredVersion))
                    .col(big_integer(Members::UpdateTime))
                    .to_owned(),
            )
            .await?;
        // Failover jobs page through members by change time.
        manager
            .create_index(
                Index::create()
                    .name("members_change_time")
                    .table(Members::Table)
                    .col(Members::ChangeTime)
                    .col(Members::MemberId)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(EnqueueRequests::Table)
                    .col(text(EnqueueRequests::RequestId).primary_key())
                    .col(blob(EnqueueRequests::Response))
                    .col(big_integer(EnqueueRequests::CreateTime))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(EnqueueRequests::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Members::Table).to_owned())
            .await
    }
}
