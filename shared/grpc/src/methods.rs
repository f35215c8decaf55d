//! The methods a server serves, by full path (`/package.Service/Method`), read from the
//! descriptor sets it serves reflection from. A metric label or a policy rule may name only
//! these: any other path (a typo, a probe, an attacker's random names) is `unknown`, so no
//! caller can create metric series at will.

use std::collections::HashSet;

use anyhow::Context as _;
use prost::Message as _;

/// The full paths of the methods of the services a server serves.
#[derive(Debug, Default)]
pub struct Methods {
    paths: HashSet<String>,
}

impl Methods {
    /// The methods of `services` described in the encoded `FileDescriptorSet`s `descriptors`.
    ///
    /// # Errors
    /// When a descriptor set does not decode.
    pub fn from_descriptors(descriptors: &[&[u8]], services: &[String]) -> anyhow::Result<Self> {
        let mut paths = HashSet::new();
        for encoded in descriptors {
            let set = prost_types::FileDescriptorSet::decode(*encoded)
                .context("a file descriptor set does not decode")?;
            for file in set.file {
                let package = file.package();
                for service in &file.service {
                    let name = if package.is_empty() {
                        service.name().to_owned()
                    } else {
                        format!("{package}.{}", service.name())
                    };
                    if !services.contains(&name) {
                        continue;
                    }
                    for method in &service.method {
                        paths.insert(format!("/{name}/{}", method.name()));
                    }
                }
            }
        }
        Ok(Self { paths })
    }

    /// These paths, for tests.
    pub fn from_paths<'a>(paths: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            paths: paths.into_iter().map(str::to_owned).collect(),
        }
    }

    /// Whether `path` is a method this server serves.
    pub fn contains(&self, path: &str) -> bool {
        self.paths.contains(path)
    }

    /// Every served path, in no particular order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.paths.iter().map(String::as_str)
    }

    /// `path` when it is a served method, else `unknown`: a bounded label value.
    pub fn label<'a>(&self, path: &'a str) -> &'a str {
        if self.contains(path) { path } else { "unknown" }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_methods_are_known() {
        let methods = Methods::from_descriptors(
            &[
                mall_proto::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
            ],
            &[
                "mall.catalog.v1.ProductCatalogService".to_owned(),
                "grpc.health.v1.Health".to_owned(),
            ],
        )
        .expect("descriptors decode");
        assert!(methods.contains("/mall.catalog.v1.ProductCatalogService/GetProduct"));
        assert!(methods.contains("/grpc.health.v1.Health/Check"));
        assert!(!methods.contains("/mall.catalog.v1.ProductCatalogService/GetProdcut"));
        assert!(
            !methods.contains("/mall.sync.v1.SyncRelayService/PauseRelay"),
            "not served"
        );
        assert_eq!(
            methods.label("/mall.catalog.v1.ProductCatalogService/x1y2z3"),
            "unknown"
        );
    }
}
