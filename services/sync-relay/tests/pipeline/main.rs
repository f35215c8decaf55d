//! The relay end to end, in one process: a real product-catalog and a real relay (embedded
//! queue) on fresh databases, driven through their gRPC APIs.

mod helpers;
#[path = "../support/kinesalite.rs"]
mod kinesalite;

mod admin;
mod flow;
mod kinesis_source;
mod tls;
