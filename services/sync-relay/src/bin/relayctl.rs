//! `relayctl`: the sync-relay admin API from a terminal; see `sync_relay::cli`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    mall_grpc::tls::install_crypto_provider();
    let mut invocation = sync_relay::cli::parse(&args, std::env::var("RELAYCTL_ADDR").ok())
        .unwrap_or_else(|error| error.exit());
    invocation.tls = invocation.tls.or(mall_grpc::tls::TlsPaths::from_env());
    sync_relay::cli::run(invocation, &mut std::io::stdout()).await
}
