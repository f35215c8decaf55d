//! `memberctl`: member-export's failover jobs and stats from a terminal; see
//! `member_export::cli`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    mall_grpc::tls::install_crypto_provider();
    let mut invocation = member_export::cli::parse(&args, std::env::var("MEMBERCTL_ADDR").ok())
        .unwrap_or_else(|error| error.exit());
    invocation.tls = invocation.tls.or(mall_grpc::tls::TlsPaths::from_env());
    member_export::cli::run(invocation, &mut std::io::stdout()).await
}
