//! `mall-certs <dir>`: a local CA and one certificate per service and caller, for
//! `scripts/dev.sh --tls` and for trying the platform with mutual TLS by hand (see the README).
//! Run through `scripts/certs.sh`. Development only: production certificates come from
//! cert-manager (`deploy/k8s`).

use std::path::PathBuf;

use mall_grpc::authz::identities;
use mall_test_support::certs::{Authority, Validity};

fn main() -> anyhow::Result<()> {
    let dir: PathBuf = match std::env::args_os().nth(1) {
        Some(dir) => dir.into(),
        None => anyhow::bail!("usage: mall-certs <output directory>"),
    };
    let ca = Authority::new(&dir, "mall")?;
    let services = [
        "product-catalog",
        "sync-relay",
        "member-export",
        "log-ingest",
    ];
    let mut issued = Vec::new();
    for service in services {
        // The relay's identity is the one the catalog's default policy lets write.
        let id = if service == "sync-relay" {
            identities::SYNC_RELAY.to_owned()
        } else {
            Authority::spiffe_id("mall-platform", service)
        };
        ca.issue(service, Some(&id), &[service], Validity::Current)?;
        issued.push((service.to_owned(), id));
    }
    for (name, id) in [
        ("admin", identities::ADMIN.to_owned()),
        ("product-producer", identities::PRODUCT_PRODUCER.to_owned()),
        ("member-system", identities::MEMBER_SYSTEM.to_owned()),
        ("log-shipper", identities::LOG_SHIPPER.to_owned()),
        // A caller the policies do not name: it may read, nothing more.
        ("reader", Authority::spiffe_id("shop", "storefront")),
    ] {
        ca.issue(name, Some(&id), &[], Validity::Current)?;
        issued.push((name.to_owned(), id));
    }
    println!("CA: {}", ca.ca_file().display());
    for (name, id) in issued {
        println!("{name}: {}/{name}.crt ({id})", dir.display());
    }
    Ok(())
}
