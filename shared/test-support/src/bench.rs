//! What the workspace's benchmarks share: the product they write, and the parts of a
//! BENCHMARKS.md section that say where and when it was measured and who used the CPU.

use mall_proto::catalog::v1::{Product, ProductStatus};
use prost_types::{ListValue, Struct, Value, value::Kind};
use std::time::Duration;

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

/// Who used the CPU during a run, in cores (CPU seconds per second of the run).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuUse {
    /// This process: the load generator and the services it runs in process.
    pub bench: f64,
    /// PostgreSQL backends serving this benchmark's databases.
    pub postgres: f64,
    /// LocalStack (SQS).
    pub localstack: f64,
    /// kinesalite (Kinesis).
    pub kinesalite: f64,
    /// Everything else on the machine (other users' builds and tests, the kernel's threads).
    pub other: f64,
}

impl CpuUse {
    /// Every category together.
    pub fn total(&self) -> f64 {
        self.bench + self.postgres + self.localstack + self.kinesalite + self.other
    }

    /// One line: each category's cores, and the machine's.
    pub fn describe(&self) -> String {
        format!(
            "bench process {:.2}, PostgreSQL {:.2}, LocalStack {:.2}, kinesalite {:.2}, other {:.2} \
             (of {} cores)",
            self.bench,
            self.postgres,
            self.localstack,
            self.kinesalite,
            self.other,
            std::thread::available_parallelism().map_or(0, usize::from)
        )
    }
}

/// CPU ticks of every process at one instant, by [`CpuUse`] category, plus the machine's
/// total from `/proc/stat`. A process that ends between two samples loses its ticks: the
/// categories are a lower bound, `other` is what the machine total says is left.
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    bench: u64,
    postgres: u64,
    localstack: u64,
    kinesalite: u64,
    busy: u64,
}

impl CpuSample {
    /// Now; PostgreSQL counts only the backends whose command line names one of
    /// `databases` (the benchmark's own).
    pub fn now(databases: &[String]) -> Self {
        let mut sample = Self {
            bench: 0,
            postgres: 0,
            localstack: 0,
            kinesalite: 0,
            busy: machine_busy_ticks(),
        };
        let me = std::process::id().to_string();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return sample;
        };
        for entry in entries.flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Some(ticks) = process_ticks(&pid) else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            if pid == me {
                sample.bench += ticks;
            } else if cmdline.starts_with("postgres:") {
                if databases.iter().any(|d| cmdline.contains(d.as_str())) {
                    sample.postgres += ticks;
                }
            } else if cmdline.contains("localstack") {
                sample.localstack += ticks;
            } else if cmdline.contains("kinesalite") {
                sample.kinesalite += ticks;
            }
        }
        sample
    }

    /// Cores used over `wall` since `self`.
    /// Cores used between `self` and `now`, `wall` apart.
    pub fn since(&self, now: &Self, wall: Duration) -> CpuUse {
        // Linux reports these in USER_HZ, 100 ticks per second.
        let cores =
            |a: u64, b: u64| b.saturating_sub(a) as f64 / 100.0 / wall.as_secs_f64().max(1e-9);
        let mut use_ = CpuUse {
            bench: cores(self.bench, now.bench),
            postgres: cores(self.postgres, now.postgres),
            localstack: cores(self.localstack, now.localstack),
            kinesalite: cores(self.kinesalite, now.kinesalite),
            other: 0.0,
        };
        use_.other = (cores(self.busy, now.busy) - use_.total()).max(0.0);
        use_
    }
}

/// User plus system ticks of process `pid`, from `/proc/<pid>/stat`.
fn process_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces): utime is the 12th.
    let rest = stat.rsplit_once(')')?.1;
    Some(
        rest.split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|f| f.parse::<u64>().ok())
            .sum(),
    )
}

/// Busy ticks of the whole machine (all CPUs), from `/proc/stat`.
fn machine_busy_ticks() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|stat| {
            let ticks: Vec<u64> = stat
                .lines()
                .next()?
                .split_whitespace()
                .skip(1)
                .filter_map(|f| f.parse().ok())
                .collect();
            let total: u64 = ticks.iter().take(8).sum();
            let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
            Some(total - idle)
        })
        .unwrap_or(0)
}
