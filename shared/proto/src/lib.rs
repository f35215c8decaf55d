//! Generated code for every `mall.*` protobuf package, and the descriptor set for reflection.
//!
//! The `.proto` files in the workspace's `proto/` directory are the contracts; this crate is
//! rebuilt whenever one of them changes. Module paths follow the packages:
//! `mall.catalog.v1` is [`catalog::v1`].
//!
//! # Layout
//! - [`catalog::v1`]: product-catalog, the product metadata API.
//! - [`sync::v1`]: sync-relay, its admin API and the product change event.
//! - [`member::v1`]: member-export, its API and the member change event.
//! - [`logs::v1`]: log-ingest, its query API.
//! - [`FILE_DESCRIPTOR_SET`]: all of the above, encoded, for server reflection.

/// The encoded `FileDescriptorSet` of every mall package (imports included).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/mall_descriptor.bin"));

/// `mall.catalog.*`
pub mod catalog {
    /// `mall.catalog.v1`: the product catalog API.
    #[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("mall.catalog.v1");
    }
}

/// `mall.sync.*`
pub mod sync {
    /// `mall.sync.v1`: the sync relay's admin API and product change events.
    #[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("mall.sync.v1");
    }
}

/// `mall.member.*`
pub mod member {
    /// `mall.member.v1`: the member export API and member change events.
    #[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("mall.member.v1");
    }
}

/// `mall.logs.*`
pub mod logs {
    /// `mall.logs.v1`: the log ingest query API.
    #[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("mall.logs.v1");
    }
}
