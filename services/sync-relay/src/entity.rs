//! sea-orm entities of the relay's own tables (see `migration` for what each holds). The
//! Kinesis source and the embedded queue keep their own tables.

/// `quarantined_records`: records that could not be decoded or validated.
pub mod quarantined_records {
    use sea_orm::entity::prelude::*;

    /// One quarantined record; `seq` is its id and its place in the oldest-first order.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "quarantined_records")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub seq: i64,
        #[sea_orm(unique)]
        pub dedup_key: String,
        pub source: String,
        pub position: String,
        pub reason: String,
        pub raw_payload: Vec<u8>,
        pub quarantine_time: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `relay_state`: the one row holding the pause switch.
pub mod relay_state {
    use sea_orm::entity::prelude::*;

    /// Whether every replica is paused, and why.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "relay_state")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i32,
        pub paused: bool,
        pub pause_reason: String,
        pub update_time: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `apply_failures`: the last error of a queue message whose apply failed.
pub mod apply_failures {
    use sea_orm::entity::prelude::*;

    /// Keyed by the queue's message id; shown on dead letters.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "apply_failures")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub message_id: String,
        pub last_error: String,
        pub update_time: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `admin_requests`: request ids of redrive calls and their first response.
pub mod admin_requests {
    use sea_orm::entity::prelude::*;

    /// `response` is the encoded response message.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "admin_requests")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub request_id: String,
        pub response: Option<Vec<u8>>,
        pub create_time: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
