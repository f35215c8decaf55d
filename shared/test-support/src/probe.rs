//! What a client sees of a running server, asked the way an outside client would ask.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

/// A lazily connected channel to `addr`.
///
/// # Panics
/// Never for a socket address; the URI is always valid.
pub fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("a socket address makes a valid uri")
        .connect_lazy()
}

/// The health status of `service` ("" for the whole server), or `None` when the call fails.
pub async fn health(addr: SocketAddr, service: &str) -> Option<ServingStatus> {
    let mut client = HealthClient::new(channel(addr));
    let response = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(response.into_inner().status).ok()
}

/// Server reflection v1's answer to one request.
///
/// # Panics
/// When reflection does not answer.
async fn reflection(addr: SocketAddr, request: MessageRequest) -> Option<MessageResponse> {
    let mut client = ServerReflectionClient::new(channel(addr));
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection answers")
        .into_inner();
    responses
        .message()
        .await
        .expect("reflection stream works")
        .expect("reflection sends a response")
        .message_response
}

/// The services listed by server reflection v1.
///
/// # Panics
/// When reflection does not answer.
pub async fn reflection_services(addr: SocketAddr) -> Vec<String> {
    match reflection(addr, MessageRequest::ListServices(String::new())).await {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection response: {other:?}"),
    }
}

/// How many file descriptors server reflection v1 returns for the file defining `symbol`
/// (a service or message name): 1, or 0 when it cannot describe it.
///
/// # Panics
/// When reflection does not answer.
pub async fn reflection_files_for(addr: SocketAddr, symbol: &str) -> usize {
    match reflection(
        addr,
        MessageRequest::FileContainingSymbol(symbol.to_owned()),
    )
    .await
    {
        Some(MessageResponse::FileDescriptorResponse(files)) => files.file_descriptor_proto.len(),
        _ => 0,
    }
}

/// Sends `GET path` over HTTP/1.1 and returns the status code and body.
///
/// # Panics
/// When the server does not answer with HTTP.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("admin server accepts connections");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("request written");
    let mut raw = String::new();
    stream
        .read_to_string(&mut raw)
        .await
        .expect("response read");
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an http response: {raw:?}"));
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
