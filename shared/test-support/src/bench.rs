//! What the workspace's benchmarks share: the product they write, and the parts of a
//! BENCHMARKS.md section that say where and when it was measured.

use mall_proto::catalog::v1::{Product, ProductStatus};
use prost_types::{ListValue, Struct, Value, value::Kind};

/// Product `i` at `version`: an apparel item as the mall sends them (two languages, two
/// currencies, a few attributes), about 700 bytes encoded. Its code is [`code`]`(i)`.
pub fn product(i: usize, version: u64) -> Product {
    let strings = |values: &[&str]| Value {
        kind: Some(Kind::ListValue(ListValue {
            values: values
                .iter()
                .map(|v| Value {
                    kind: Some(Kind::StringValue((*v).to_owned())),
                })
                .collect(),
        })),
    };
    Product {
        code: code(i),
        product_type: "apparel".into(),
        brand: format!("Brand {}", i % 300),
        category_path: vec!["women".into(), "outerwear".into(), "coats".into()],
        status: ProductStatus::OnSale as i32,
        names: [
            ("ko".to_owned(), format!("울 블렌드 코트 {i} ({version})")),
            ("en".to_owned(), format!("Wool blend coat {i} ({version})")),
        ]
        .into(),
        descriptions: [
            (
                "ko".to_owned(),
                "부드러운 울 블렌드 소재의 싱글 브레스티드 코트입니다. ".repeat(3),
            ),
            (
                "en".to_owned(),
                "A single-breasted coat in a soft wool blend. ".repeat(3),
            ),
        ]
        .into(),
        prices: [
            ("KRW".to_owned(), 259_000 + version as i64),
            ("USD".to_owned(), 19_900),
        ]
        .into(),
        attributes: Some(Struct {
            fields: [
                ("sizes".to_owned(), strings(&["S", "M", "L", "XL"])),
                ("colors".to_owned(), strings(&["camel", "charcoal"])),
                ("materials".to_owned(), strings(&["wool", "polyester"])),
                (
                    "fit".to_owned(),
                    Value {
                        kind: Some(Kind::StringValue("regular".into())),
                    },
                ),
            ]
            .into(),
        }),
        version,
        ..Product::default()
    }
}

/// The code of benchmark product `i`: `P-000042`.
pub fn code(i: usize) -> String {
    format!("P-{i:06}")
}

/// Replaces the text between `<!-- name:begin -->` and `<!-- name:end -->` in the workspace's
/// BENCHMARKS.md (appending it when absent), leaving everything else alone.
///
/// # Errors
/// When BENCHMARKS.md cannot be written.
pub fn replace_section(name: &str, section: &str) -> anyhow::Result<()> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../BENCHMARKS.md");
    let current = std::fs::read_to_string(path).unwrap_or_else(|_| {
        "# Benchmarks\n\nEach section is written by its benchmark; see the command in it.\n".into()
    });
    let (begin, end) = (
        format!("<!-- {name}:begin -->"),
        format!("<!-- {name}:end -->"),
    );
    let block = format!("{begin}\n{section}{end}");
    let updated = match (current.find(&begin), current.find(&end)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{block}{}", &current[..b], &current[e + end.len()..])
        }
        _ => format!("{}\n\n{block}\n", current.trim_end()),
    };
    std::fs::write(path, updated)?;
    eprintln!("wrote the {name} section of BENCHMARKS.md");
    Ok(())
}

/// "Measured <date> on <n> cores (<cpu>), <memory> GiB."
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or_else(String::new, |kb| format!(", {} GiB", kb / 1024 / 1024));
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    format!("Measured {date} on {cores} cores ({cpu}){memory}.")
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` gives them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// The version of the local `psql`, standing for the PostgreSQL server on the same machine.
pub fn postgres_version() -> String {
    std::process::Command::new("psql")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.split_whitespace().nth(2).map(str::to_owned))
        .unwrap_or_else(|| "(version unknown)".into())
}

/// A memory line of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), KiB; 0 when unreadable.
pub fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or_default()
}
