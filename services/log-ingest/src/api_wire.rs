//! The contract's server (`mall.logs.v1.LogIngestService`), with TestParse's lines counted
//! before its request is decoded.
//!
//! Decoded, an empty line takes 24 bytes (a `String`) for the 2 it is sent in, so the
//! `server.max_message_bytes` a request may hold (16 MiB by default) would be 8M lines and
//! about 300 MB (with the vector's growth) before the handler could refuse them for
//! passing the contract's 1,000. Here the lines are counted in the request's bytes first
//! (its framing walked, nothing allocated), and only a request within the limit is decoded:
//! it then takes its bytes and 1,000 `String`s at most. Every other method goes to the
//! server tonic generates.

use std::{convert::Infallible, sync::Arc};

use bytes::Buf as _;
use mall_grpc::ServiceError;
use mall_proto::logs::v1::{
    TestParseRequest, TestParseResponse,
    log_ingest_service_server::{LogIngestService, LogIngestServiceServer},
};
use prost::Message as _;
use tonic::{
    Status,
    body::Body,
    codec::DecodeBuf,
    codegen::BoxFuture,
    server::{NamedService, UnaryService},
};

use tokio::sync::OwnedSemaphorePermit;

use crate::{api::LogsApi, parsing, wire};

const TEST_PARSE: &str = "/mall.logs.v1.LogIngestService/TestParse";

/// `TestParseRequest.lines`' field number.
const LINES: u64 = 2;

/// The contract's service: TestParse through its own codec ([`decode_test_parse`]), the
/// other methods through tonic's.
#[derive(Debug, Clone)]
pub struct ContractServer {
    api: Arc<LogsApi>,
    generated: LogIngestServiceServer<LogsApi>,
    max_decoding_message_size: usize,
}

impl ContractServer {
    /// `api`'s service, taking requests of up to `max_decoding_message_size` bytes.
    pub fn new(api: LogsApi, max_decoding_message_size: usize) -> Self {
        let api = Arc::new(api);
        Self {
            generated: LogIngestServiceServer::from_arc(api.clone())
                .max_decoding_message_size(max_decoding_message_size),
            api,
            max_decoding_message_size,
        }
    }
}

impl NamedService for ContractServer {
    const NAME: &'static str = <LogIngestServiceServer<LogsApi> as NamedService>::NAME;
}

impl tower::Service<http::Request<Body>> for ContractServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // As tonic's generated server: always ready.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != TEST_PARSE {
            return self.generated.call(request);
        }
        // A slot first: a call past the limit is answered before its body is read.
        let slot = match self.api.test_parse_slot() {
            Ok(slot) => slot,
            Err(busy) => return Box::pin(async move { Ok(busy.into_http()) }),
        };
        let (api, limit) = (self.api.clone(), self.max_decoding_message_size);
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(TestParseCodec)
                .apply_max_message_size_config(Some(limit), None);
            Ok(grpc.unary(TestParseMethod(api, Some(slot)), request).await)
        })
    }
}

/// The handler, as tonic's unary call wants it, with its slot.
struct TestParseMethod(Arc<LogsApi>, Option<OwnedSemaphorePermit>);

impl UnaryService<TestParseRequest> for TestParseMethod {
    type Response = TestParseResponse;
    type Future = BoxFuture<tonic::Response<TestParseResponse>, Status>;

    fn call(&mut self, request: tonic::Request<TestParseRequest>) -> Self::Future {
        let (api, slot) = (self.0.clone(), self.1.take());
        Box::pin(async move {
            match slot {
                Some(slot) => api.test_parse_in(slot, request).await,
                None => api.test_parse(request).await,
            }
        })
    }
}

/// Answers encoded by prost; requests decoded by [`decode_test_parse`].
#[derive(Debug, Clone, Copy, Default)]
struct TestParseCodec;

impl tonic::codec::Codec for TestParseCodec {
    type Encode = TestParseResponse;
    type Decode = TestParseRequest;
    type Encoder = tonic_prost::ProstEncoder<TestParseResponse>;
    type Decoder = TestParseDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        TestParseDecoder
    }
}

#[derive(Debug)]
struct TestParseDecoder;

impl tonic::codec::Decoder for TestParseDecoder {
    type Item = TestParseRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<TestParseRequest>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        decode_test_parse(&bytes).map(Some)
    }
}

/// `bytes` as a TestParse request, decoded only when it holds at most
/// [`parsing::MAX_LINES`] lines.
///
/// # Errors
/// INVALID_ARGUMENT when it holds more lines, or is no `TestParseRequest`.
pub fn decode_test_parse(bytes: &[u8]) -> Result<TestParseRequest, Status> {
    let mut lines = 0_usize;
    for line in wire::fields(bytes, LINES) {
        line.map_err(not_a_request)?;
        lines += 1;
    }
    if lines > parsing::MAX_LINES {
        return Err(ServiceError::invalid("lines", parsing::too_many_lines(lines)).into());
    }
    TestParseRequest::decode(bytes).map_err(not_a_request)
}

/// INVALID_ARGUMENT for bytes that are not a `TestParseRequest`, of no one field (prost's
/// own decoding error would be INTERNAL, as tonic maps it; its text names the field).
fn not_a_request(why: impl std::fmt::Display) -> Status {
    ServiceError::invalid("", format!("not a TestParseRequest: {why}")).into()
}
