//! sea-orm entities of the catalog's tables (see the migration for what each column holds).

/// `products`: one row per product, keyed by code.
pub mod products {
    use sea_orm::entity::prelude::*;

    /// A stored product. Maps and lists are JSON text; times are microseconds since the epoch.
    /// `version` is the highest of the `*_version` columns, each the version of the change
    /// that last wrote that field (0: never written). `status` 0 marks a pending product.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "products")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub code: String,
        pub product_type: String,
        pub brand: String,
        pub category_path: String,
        pub status: i16,
        pub names: String,
        pub descriptions: String,
        pub prices: String,
        pub attributes: String,
        pub version: i64,
        pub create_time: i64,
        pub update_time: i64,
        pub brand_version: i64,
        pub category_path_version: i64,
        pub status_version: i64,
        pub names_version: i64,
        pub descriptions_version: i64,
        pub prices_version: i64,
        pub attributes_version: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `product_changes`: the change log WatchProductChanges streams from.
pub mod product_changes {
    use sea_orm::entity::prelude::*;

    /// One applied change; `product` is the encoded `mall.catalog.v1.Product` after it,
    /// `written_fields` the bits of the fields it wrote (`UpdateMask::bits`), `version` the
    /// product's version after it and `change_version` the change's own. `xid` is the
    /// writing transaction's id on PostgreSQL (0 on SQLite): the log's order is `(xid, seq)`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "product_changes")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub seq: i64,
        pub xid: i64,
        pub code: String,
        pub product_type: String,
        pub version: i64,
        pub previous_version: i64,
        pub commit_time: i64,
        pub product: Vec<u8>,
        pub written_fields: i16,
        pub change_version: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `change_log_state`: one row, how far the change log has been pruned.
pub mod change_log_state {
    use sea_orm::entity::prelude::*;

    /// `(pruned_xid, pruned_through)`: the highest `(xid, seq)` position deleted by retention.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "change_log_state")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i32,
        pub pruned_through: i64,
        pub pruned_xid: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `bulk_requests`: request ids of BulkUpdateProducts and their first response.
pub mod bulk_requests {
    use sea_orm::entity::prelude::*;

    /// `response` is the encoded `BulkUpdateProductsResponse`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "bulk_requests")]
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
